//! The delivery pipeline of one cycle: a claimed batch goes tier by tier (a Patient before
//! what refers to it) through map → send → judge → settle; while a full batch is in flight the
//! next one is claimed, and its first tier mapped and sent as soon as this one is answered.

use super::claim::{self, Claimed};
use super::map::{self, Action, Mode};
use super::settle::{self, Settlement};
use super::{send, Tracks, Worker};
use crate::error::FhirSyncError;
use crate::http::{Method, Response};
use crate::shmem;
use pgrx::pg_sys;
use std::time::{Duration, Instant};

/// A claimed batch waiting for its round; its first tier may be mapped already.
pub(super) struct Next {
    claimed: Vec<Claimed>,
    mapped: Option<Mapped>,
}

impl Next {
    pub(super) fn claimed(claimed: Vec<Claimed>) -> Self {
        Next {
            claimed,
            mapped: None,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.claimed.len() + self.mapped.as_ref().map_or(0, |m| m.tier.len())
    }
}

/// One tier, mapped: the actions, and the requests made of them.
struct Mapped {
    tier: Vec<Claimed>,
    actions: Vec<Action>,
    /// For each claimed resource, its request (None: settled without one).
    request_of: Vec<Option<usize>>,
    deps: Vec<(pg_sys::Oid, String)>,
    /// The identities its requests write (identity::guard sees them while they are in flight).
    identities: Vec<fhir_sync_core::identity::Claim>,
    stage: Stage,
}

/// Where a mapped tier's requests are.
enum Stage {
    /// Built, not sent yet.
    Ready(Vec<send::Outgoing>),
    /// On their way: the sending threads have them.
    Sent(send::InFlight),
}

impl Worker {
    /// Delivers one claimed batch, tier by tier (a Patient before what refers to it). With
    /// `ahead`, the next batch is claimed while the last tier is in flight, and its first tier
    /// mapped if it refers to nothing; it is returned for the next round. It never holds a
    /// resource that is in flight: the claim passes those over.
    pub(super) fn deliver(
        &mut self,
        schema: &str,
        batch: Next,
        ahead: bool,
    ) -> Result<Option<Next>, FhirSyncError> {
        // What was in flight before this batch has been settled.
        self.flying.clear();
        let tracks = match self.tracks(schema, &batch.claimed) {
            Ok(t) => t,
            Err(e) => {
                // Hand the batch back now rather than when its lease ends; what of it is on its
                // way is answered first (a re-send of it is harmless, two at once are not).
                self.release(&batch.claimed);
                if let Some(m) = batch.mapped {
                    if let Stage::Sent(f) = m.stage {
                        self.collect(f);
                    }
                    self.release(&m.tier);
                }
                return Err(e);
            }
        };
        let mut tiers: [Vec<Claimed>; 3] = Default::default();
        for c in batch.claimed {
            let t = tracks
                .get(&c.resource_table)
                .map(|t| t.mapper.tier())
                .unwrap_or(0);
            tiers[t].push(c);
        }
        let mut mapped = batch.mapped;
        if mapped.is_some() && !tiers[0].is_empty() {
            // A table whose mapper changed tier since the batch was claimed ahead: its resources
            // go back rather than being dropped with their leases held.
            let moved = std::mem::take(&mut tiers[0]);
            self.release(&moved);
        }
        let last = tiers.iter().rposition(|t| !t.is_empty());
        let mut next: Option<Result<Next, FhirSyncError>> = None;
        for (t, tier) in tiers.into_iter().enumerate() {
            let is_last = t == last.unwrap_or(0);
            let work = match (t, mapped.take()) {
                (0, Some(m)) => m,
                _ if tier.is_empty() => continue,
                _ => {
                    if self.holding_back() {
                        self.release(&tier);
                        continue;
                    }
                    self.map(schema, &tracks, tier)?
                }
            };
            // Requests already on their way are seen through whatever happened meanwhile.
            if matches!(work.stage, Stage::Ready(_)) && self.holding_back() {
                self.release(&work.tier);
                continue;
            }
            let in_flight: claim::ResourcesInFlight = work
                .tier
                .iter()
                .map(|c| (c.resource_table, c.resource_key.clone()))
                .collect();
            let Mapped {
                tier,
                actions,
                request_of,
                deps,
                identities,
                stage,
            } = work;
            // What this tier writes is in flight until it is settled: the batch claimed ahead
            // is planned against it.
            self.flying = identities;
            let flight = match stage {
                Stage::Sent(f) => f,
                Stage::Ready(requests) => self.launch(requests),
            };
            if ahead && is_last {
                next = Some(self.claim_ahead(schema, &tracks, &in_flight));
            }
            let responses = self.collect(flight);
            let mut settlement = self.judge(&tier, &actions, &request_of, &responses, deps);
            if let Err(e) = super::apply::merged_on_the_server(schema, &mut settlement) {
                // Not worth failing the batch for: the settlement stands as judged.
                pgrx::log!(
                    "fhir_sync worker: could not check first writes for shared resources: {}",
                    e.log_form()
                );
            }
            if is_last && !self.holding_back() {
                // The next batch's first tier refers to nothing in this one: it goes out now,
                // and its HTTP overlaps this settle.
                if let Some(Ok(Next {
                    mapped: Some(m), ..
                })) = &mut next
                {
                    if let Stage::Ready(requests) = &mut m.stage {
                        let requests = std::mem::take(requests);
                        m.stage = Stage::Sent(self.launch(requests));
                    }
                }
            }
            let settled = self.settle(schema, &settlement);
            self.flying.clear();
            if let Err(e) = settled {
                // The batch claimed ahead goes back at once rather than when its lease ends
                // (after the answers to what of it was sent: a re-send is harmless). This tier's
                // leases stay until the failed cycle ends them.
                if let Some(Ok(n)) = next {
                    self.release(&n.claimed);
                    if let Some(m) = n.mapped {
                        if let Stage::Sent(f) = m.stage {
                            self.collect(f);
                        }
                        self.release(&m.tier);
                    }
                }
                return Err(e);
            }
            // What was settled is visible to every claim now: its leases end.
            self.leases.release(&tier);
            if settlement.handed_back {
                self.floor.reset();
            }
        }
        next.transpose()
    }

    /// Claims the next batch while the current one is in flight, and maps its first tier (it
    /// refers to nothing that could be in flight).
    fn claim_ahead(
        &mut self,
        schema: &str,
        tracks: &Tracks,
        in_flight: &claim::ResourcesInFlight,
    ) -> Result<Next, FhirSyncError> {
        let claimed = crate::subxact::transaction_flat(|| {
            claim::claim(
                schema,
                crate::gucs::batch_size(),
                crate::gucs::lease_time_ms(),
                in_flight,
                &mut self.floor,
                Some(&mut self.leases),
            )
        })?;
        if claimed
            .iter()
            .any(|c| !tracks.contains_key(&c.resource_table))
        {
            // A table tracked since: mapped in its round, with the tracks read again.
            return Ok(Next {
                claimed,
                mapped: None,
            });
        }
        let (first, rest): (Vec<Claimed>, Vec<Claimed>) = claimed
            .into_iter()
            .partition(|c| tracks[&c.resource_table].mapper.tier() == 0);
        let mapped = if first.is_empty() {
            None
        } else {
            Some(self.map(schema, tracks, first)?)
        };
        Ok(Next {
            claimed: rest,
            mapped,
        })
    }

    /// Starts sending, at the concurrency the server currently allows.
    fn launch(&mut self, requests: Vec<send::Outgoing>) -> send::InFlight {
        use crate::gucs as g;
        // A server whose CapabilityStatement leaves this Bundle type out gets single requests.
        let bundles = self
            .client
            .as_ref()
            .and_then(|c| c.capabilities())
            .is_none_or(|c| c.bundles(g::bundle_type()));
        let grouping = send::Grouping {
            bundle_size: if bundles { g::bundle_size() } else { 0 },
            bundle_type: g::bundle_type(),
            in_flight: self.in_flight(g::max_in_flight()),
            // Half the lease: a request started before this ends (http_timeout) well within it.
            deadline: Instant::now() + Duration::from_millis(g::lease_time_ms() as u64 / 2),
            record_call: shmem::record_call,
        };
        // The batch's leases last from here: its later tiers go out long after its claim.
        self.leases.refresh(g::lease_time_ms());
        let client = self.client.clone().expect("checked in cycle");
        send::start(&client, requests, grouping)
    }

    /// The answers, or None for what was not sent because the worker must go.
    fn collect(&self, flight: send::InFlight) -> Vec<Option<Response>> {
        flight.finish(&|| self.must_leave())
    }

    /// Maps one tier and builds its requests.
    fn map(
        &mut self,
        schema: &str,
        tracks: &Tracks,
        tier: Vec<Claimed>,
    ) -> Result<Mapped, FhirSyncError> {
        let mut deps = Vec::new();
        let caps = self.capabilities(tracks);
        let mut identities = Vec::new();
        let flying = std::mem::take(&mut self.flying);
        let planned = crate::subxact::transaction_flat(|| {
            map::plan(
                schema,
                tracks,
                &tier,
                Mode::Deliver,
                caps.as_deref(),
                &flying,
                &mut identities,
                &mut deps,
            )
        });
        self.flying = flying;
        let mut actions = planned?;
        let mut requests = Vec::new();
        let mut request_of = vec![None; tier.len()];
        for (i, a) in actions.iter_mut().enumerate() {
            let req = match a {
                Action::Put {
                    path,
                    body,
                    if_match,
                    create,
                    ..
                } => send::Outgoing {
                    method: if create.is_some() {
                        Method::Post
                    } else {
                        Method::Put
                    },
                    path: path.clone(),
                    // Moved, not copied: judge() needs only the kind and identifier.
                    body: Some(std::mem::take(&mut **body)),
                    if_match: if_match.clone(),
                    create: create.as_deref().cloned(),
                },
                Action::Delete { path, .. } => send::Outgoing {
                    method: Method::Delete,
                    path: path.clone(),
                    body: None,
                    if_match: None,
                    create: None,
                },
                _ => continue,
            };
            request_of[i] = Some(requests.len());
            requests.push(req);
        }
        Ok(Mapped {
            tier,
            actions,
            request_of,
            deps,
            identities,
            stage: Stage::Ready(requests),
        })
    }

    /// Hands changes back without spending attempts: nothing was sent (or nothing that is
    /// still on its way). They may lie below the claim's floor: the next claim scans from the
    /// front.
    pub(super) fn release(&mut self, tier: &[Claimed]) {
        if !tier.is_empty() {
            self.leases.release(tier);
            self.floor.reset();
        }
    }

    /// Records a settlement in its own transaction.
    fn settle(&mut self, schema: &str, s: &Settlement) -> Result<(), FhirSyncError> {
        crate::subxact::transaction_flat(|| settle::settle(schema, s))
    }
}
