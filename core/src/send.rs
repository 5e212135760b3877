//! Send: the requests of one tier of a batch, as single requests or Bundles, up to
//! fhir_sync.max_in_flight HTTP requests at once.
//!
//! Runs with no transaction open. The extra threads do HTTP only (no PostgreSQL calls) and
//! block all signals, so PostgreSQL's handlers keep running on the worker's main thread.
//! Each request is for a different resource (the claim guarantees it), so concurrency never
//! puts two requests for one resource in flight, and a Bundle never holds one resource twice.

use crate::http::{weak_etag, Client, Method, Response, Transport};
use crate::policy::{classify, Class, Verdict, CONFLICT_RESENDS};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub struct Outgoing {
    pub method: Method,
    pub path: String,
    pub body: Option<Value>,
    /// The version the update is conditional on (`W/"3"`), sent as If-Match.
    pub if_match: Option<String>,
    /// A conditional create (`POST [base]/Type`, `If-None-Exist`) instead of an update.
    pub create: Option<Create>,
}

/// A first write as a conditional create: the server makes the resource unless one matches the
/// search; a retried create therefore finds what its lost predecessor made.
#[derive(Clone, Debug, PartialEq)]
pub struct Create {
    /// The search (`identifier=system%7Cvalue`), sent as If-None-Exist.
    pub if_none_exist: String,
    /// When the server already holds a matching resource (it answers 200 and writes nothing):
    /// update it by id with this body (write mode `create`), or leave it as it is (`create_only`).
    pub update_found: bool,
}

/// How a tracked table's resources are written (`fhir_track(write_mode => …)`, default
/// `fhir_sync.write_mode`). Also the enum of that setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "guc", derive(pgrx::PostgresGucEnum))]
pub enum WriteMode {
    /// Conditional update by identifier first (update-as-create), by id after that.
    #[cfg_attr(feature = "guc", name = c"upsert")]
    Upsert,
    /// Conditional create (`POST` with `If-None-Exist`) first, updates by id after that: for
    /// servers that do not allow update-as-create.
    #[cfg_attr(feature = "guc", name = c"create")]
    Create,
    /// Conditional create only, for servers that accept no update of the type: a later change
    /// of a created resource is not sent (dead-lettered as `not_sendable`).
    #[cfg_attr(feature = "guc", name = c"create_only")]
    CreateOnly,
}

impl WriteMode {
    pub fn name(self) -> &'static str {
        match self {
            WriteMode::Upsert => "upsert",
            WriteMode::Create => "create",
            WriteMode::CreateOnly => "create_only",
        }
    }

    pub fn parse(s: &str) -> Option<WriteMode> {
        [WriteMode::Upsert, WriteMode::Create, WriteMode::CreateOnly]
            .into_iter()
            .find(|m| m.name() == s)
    }
}

/// Bundle type: batch (entries succeed or fail one by one) or transaction (all or nothing; a
/// failed transaction is re-sent entry by entry to find the bad one). Also the enum of the
/// `fhir_sync.bundle_type` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "guc", derive(pgrx::PostgresGucEnum))]
pub enum BundleType {
    #[cfg_attr(feature = "guc", name = c"batch")]
    Batch,
    #[cfg_attr(feature = "guc", name = c"transaction")]
    Transaction,
}

/// How requests are grouped: one HTTP request each, or Bundles of up to `size` entries.
#[derive(Clone, Copy, Debug)]
pub struct Grouping {
    pub bundle_size: usize,
    pub bundle_type: BundleType,
    pub in_flight: usize,
    /// No request starts after this: the claim's lease must outlive every request of the batch,
    /// or another worker could take a resource over while it is still in flight.
    pub deadline: std::time::Instant,
    /// Counts one answered call and its duration in seconds (the shared metrics); called from
    /// the sending threads, so it must not call into PostgreSQL.
    pub record_call: fn(f64),
}

/// What the sending threads share with the worker's main thread.
struct Shared {
    requests: Vec<Outgoing>,
    units: Vec<std::ops::Range<usize>>,
    results: Vec<Mutex<Option<Response>>>,
    next: AtomicUsize,
    done: AtomicUsize,
    stop: AtomicBool,
    grouping: Grouping,
}

/// Requests on their way: the sending threads work through them while the worker's main thread
/// does something else (claims and maps the next batch), then collects the answers with
/// [`InFlight::finish`].
pub struct InFlight {
    shared: Arc<Shared>,
    threads: usize,
}

/// Starts sending every request on up to `g.in_flight` of the worker's sending threads and
/// returns at once.
pub fn start(client: &Arc<Client>, requests: Vec<Outgoing>, g: Grouping) -> InFlight {
    let size = g.bundle_size.min(client.bundle_limit()).max(1);
    let units: Vec<std::ops::Range<usize>> = (0..requests.len())
        .step_by(size)
        .map(|s| s..(s + size).min(requests.len()))
        .collect();
    let threads = g.in_flight.min(units.len());
    let n = requests.len();
    let shared = Arc::new(Shared {
        results: (0..n).map(|_| Mutex::new(None)).collect(),
        requests,
        units,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        grouping: g,
    });
    let main = std::thread::current();
    for _ in 0..threads {
        let (shared, client, main) = (shared.clone(), client.clone(), main.clone());
        crate::pool::run(move || {
            let _done = Done(&shared.done, main);
            work(&shared, &client);
        });
    }
    InFlight { shared, threads }
}

/// Counts a sending thread as finished when its work ends, normally or by a panic (the pool
/// catches it): `finish` waits for every thread, and must not wait for one that died.
struct Done<'a>(&'a AtomicUsize, std::thread::Thread);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::AcqRel);
        self.1.unpark();
    }
}

impl InFlight {
    /// Waits for the answers; `None` for requests not sent because the server asked the
    /// worker to stop (unreachable, credentials rejected, throttled), the deadline passed, or
    /// `interrupted` said the worker must go (SIGTERM, DROP DATABASE) before their turn.
    ///
    /// The HTTP runs on threads; the main thread only watches. A request that hangs until its
    /// timeout therefore never holds up a shutdown or a DROP DATABASE: the worker hands back
    /// what was not answered and leaves; the thread goes back to the pool when its request ends.
    pub fn finish(self, interrupted: &dyn Fn() -> bool) -> Vec<Option<Response>> {
        let shared = self.shared;
        while shared.done.load(Ordering::Acquire) < self.threads {
            if interrupted() {
                shared.stop.store(true, Ordering::Release);
                break;
            }
            std::thread::park_timeout(std::time::Duration::from_millis(20));
        }
        shared
            .results
            .iter()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()).take())
            .collect()
    }
}

fn work(shared: &Shared, client: &Client) {
    let client = &Conn {
        client,
        record_call: shared.grouping.record_call,
    };
    loop {
        if shared.stop.load(Ordering::Acquire)
            || std::time::Instant::now() >= shared.grouping.deadline
        {
            return;
        }
        let u = shared.next.fetch_add(1, Ordering::AcqRel);
        let Some(range) = shared.units.get(u) else {
            return;
        };
        let chunk = &shared.requests[range.clone()];
        let responses = if chunk.len() == 1 {
            vec![send_one(client, &chunk[0])]
        } else {
            send_bundle(
                client,
                chunk,
                shared.grouping.bundle_type,
                shared.grouping.deadline,
            )
        };
        if shared.stop.load(Ordering::Acquire) {
            // The worker has moved on and released these changes: their answer must not be
            // mistaken for a settlement.
            return;
        }
        for (i, resp) in range.clone().zip(responses) {
            if halts_sending(&resp, shared.requests[i].method == Method::Delete) {
                shared.stop.store(true, Ordering::Release);
            }
            *shared.results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(resp);
        }
    }
}

fn call(
    client: &Conn,
    method: Method,
    path: &str,
    body: Option<&Value>,
    if_match: Option<&str>,
) -> Response {
    let bytes = body.and_then(|b| serde_json::to_vec(b).ok());
    call_raw(client, method, path, bytes.as_deref(), (if_match, None))
}

fn call_raw(
    client: &Conn,
    method: Method,
    path: &str,
    body: Option<&[u8]>,
    (if_match, if_none_exist): (Option<&str>, Option<&str>),
) -> Response {
    let resp = client
        .client
        .request_with(method, path, body, if_match, if_none_exist);
    // A connection that could not be made is not a call: its near-zero duration would only
    // drag the latency quantiles down during an outage.
    if resp.transport != Transport::ConnectFailed {
        (client.record_call)(resp.elapsed.as_secs_f64());
    }
    resp
}

/// The client and the meter its calls are counted in.
struct Conn<'a> {
    client: &'a Client,
    record_call: fn(f64),
}

fn send_one(client: &Conn, req: &Outgoing) -> Response {
    if let Some(create) = &req.create {
        let bytes = req.body.as_ref().and_then(|b| serde_json::to_vec(b).ok());
        let resp = call_raw(
            client,
            Method::Post,
            &req.path,
            bytes.as_deref(),
            (None, Some(&create.if_none_exist)),
        );
        let resp = after_create(client, req, create, resp);
        return with_id(client, req, resp);
    }
    let mut if_match = req.if_match.clone();
    let mut resends = 0;
    loop {
        let resp = call(
            client,
            req.method,
            &req.path,
            req.body.as_ref(),
            if_match.as_deref(),
        );
        if resends == CONFLICT_RESENDS {
            return resp;
        }
        match resp.transport {
            // The server holds another version than the one we last wrote: another writer's,
            // a request of ours we had given up on that arrived late, or a version a crash made
            // us forget (the version cache is unlogged). What we send is the row as it stands
            // now, so it is the state to keep: send it again on the version the server holds
            // now (unconditionally if the server no longer has it). R4 servers say 412; STU3
            // ones, and HAPI, say 409 to a stale If-Match.
            Transport::Status(status @ (409 | 412)) if if_match.is_some() => {
                match current_version(client, &req.path) {
                    // A 409 on the version the server holds is not about the version (HAPI says
                    // 409 to other conflicts too): a race, sent again as it is.
                    Ok(v) if status == 409 && v == if_match => {}
                    Ok(v) => if_match = v,
                    Err(failed) => return *failed,
                }
            }
            // A concurrent write won the race; the resource we send is still the latest.
            Transport::Status(409) => {}
            _ => return with_id(client, req, resp),
        }
        resends += 1;
    }
}

/// The answer to a conditional create. 201: made. 200: the server already held a matching
/// resource and wrote nothing; in write mode `create` the row's state is then written to it by
/// id (the id read from the answer, or searched for when the answer does not say).
fn after_create(client: &Conn, req: &Outgoing, create: &Create, resp: Response) -> Response {
    if resp.transport != Transport::Status(200) || !create.update_found {
        return resp;
    }
    // The answer names the resource only if it is one of the type asked for: an id read from
    // an OperationOutcome, a Bundle or another type must not choose which resource is updated.
    let typed = serde_json::from_slice::<Stored>(&resp.body)
        .ok()
        .and_then(|b| b.resource_type)
        .is_none_or(|t| t == req.path)
        && resp
            .location
            .as_deref()
            .is_none_or(|l| l.split('/').any(|seg| seg == req.path));
    let named = match crate::response::resource_id(&resp) {
        Ok((Some(id), version)) if typed => Some((id, version)),
        Ok(_) if typed => None,
        _ => return resp,
    };
    let (id, version) = match named {
        Some(n) => n,
        None => match find_one(client, &req.path, &create.if_none_exist) {
            Ok(found) => found,
            Err(failed) => return *failed,
        },
    };
    let mut body = req.body.clone().unwrap_or(Value::Null);
    body["id"] = Value::String(id.clone());
    // On the version the server just showed: if this PUT arrives late, after a newer write,
    // it fails its precondition instead of undoing that write.
    let if_match = version.map(|v| weak_etag(&v));
    call(
        client,
        Method::Put,
        &format!("{}/{id}", req.path),
        Some(&body),
        if_match.as_deref(),
    )
}

/// A write by identifier (a conditional update or create) the server applied but answered
/// without naming the resource (no body, Location or ETag, as with `Prefer: return=minimal`):
/// the id is read with a search, so that later writes address it by id.
fn with_id(client: &Conn, req: &Outgoing, mut resp: Response) -> Response {
    let Transport::Status(200..=299) = resp.transport else {
        return resp;
    };
    // Cheap tests first: this runs on every delivered write, and the body is parsed once later.
    if resp.location.is_some() || !resp.body.is_empty() {
        return resp;
    }
    let (type_path, search) = match (&req.create, req.path.split_once('?')) {
        (Some(c), _) => (req.path.as_str(), c.if_none_exist.as_str()),
        (None, Some((t, q))) if req.method == Method::Put => (t, q),
        _ => return resp,
    };
    if let Ok((id, version)) = find_one(client, type_path, search) {
        resp.location = Some(match version {
            Some(v) => format!("{type_path}/{id}/_history/{v}"),
            None => format!("{type_path}/{id}"),
        });
    }
    resp
}

/// The id (and version) of the one resource of `type_path` that `search` finds.
fn find_one(
    client: &Conn,
    type_path: &str,
    search: &str,
) -> Result<(String, Option<String>), Box<Response>> {
    let resp = call(
        client,
        Method::Get,
        &format!("{type_path}?{search}"),
        None,
        None,
    );
    if resp.transport != Transport::Status(200) {
        return Err(Box::new(resp));
    }
    let ids: Option<Vec<(String, Option<String>)>> = serde_json::from_slice::<Value>(&resp.body)
        .ok()
        .and_then(|b| {
            b.get("entry")?
                .as_array()?
                .iter()
                .map(|e| {
                    let id = e.pointer("/resource/id")?.as_str()?.to_string();
                    let v = e
                        .pointer("/resource/meta/versionId")
                        .and_then(Value::as_str)
                        .filter(|v| crate::http::is_fhir_id(v))
                        .map(str::to_string);
                    Some((id, v))
                })
                .collect()
        });
    match ids.as_deref() {
        Some([(id, v)]) if crate::http::is_fhir_id(id) => Ok((id.clone(), v.clone())),
        _ => {
            let mut broken = resp.clone();
            broken.transport = Transport::Broken;
            broken.error = Some(
                "the server matched an existing resource but did not say which, and a search found none or several"
                    .into(),
            );
            Err(Box::new(broken))
        }
    }
}

/// The version the server holds of `Type/id` as an If-Match value; None when it has none (gone).
fn current_version(client: &Conn, path: &str) -> Result<Option<String>, Box<Response>> {
    let resp = call(client, Method::Get, path, None, None);
    match resp.transport {
        Transport::Status(404 | 410) => Ok(None),
        // A version that is not a FHIR id is not put in a header: send unconditionally.
        Transport::Status(200) => Ok(crate::response::resource_id(&resp)
            .ok()
            .and_then(|ids| ids.1)
            .map(|v| weak_etag(&v))),
        _ => Err(Box::new(resp)),
    }
}

/// POSTs one Bundle and splits its answer into one response per entry. A transaction that
/// fails as a whole does not say which entry was at fault: its entries are then sent one by
/// one, so that only the bad one is dead-lettered.
///
/// A Bundle the server refuses as too large (413, or an OperationOutcome saying so) or that
/// times out is sent again as two halves, down to single requests, instead of being retried at
/// the same size until its changes are dead-lettered; after a refusal the client sends Bundles
/// of at most half that size until the settings are reloaded.
fn send_bundle(
    client: &Conn,
    chunk: &[Outgoing],
    kind: BundleType,
    deadline: std::time::Instant,
) -> Vec<Response> {
    let bundle = bundle_bytes(chunk, kind);
    let resp = call_raw(client, Method::Post, "", Some(&bundle), (None, None));
    if let Some(why) = split_reason(&resp) {
        if why == Split::Refused {
            client.client.lower_bundle_limit(chunk.len() / 2);
        }
        if std::time::Instant::now() >= deadline {
            // Not sent again: the claim's lease may end before the halves are answered.
            let mut held = resp.clone();
            held.transport = Transport::Broken;
            held.error = Some(format!(
                "a Bundle of {} entries was refused or timed out and the batch ran out of time to send it in halves",
                chunk.len()
            ));
            return vec![held; chunk.len()];
        }
        if chunk.len() == 1 {
            return vec![send_one(client, &chunk[0])];
        }
        let (a, b) = chunk.split_at(chunk.len() / 2);
        let mut out = send_bundle(client, a, kind, deadline);
        if why == Split::TimedOut && out.iter().all(|r| r.transport == Transport::Broken) {
            // Half the size timed out as well: the server is slow, not the Bundle too big.
            // The other half is not tried (a hung server would otherwise see 2n requests).
            out.extend(std::iter::repeat_n(resp, b.len()));
            return out;
        }
        out.extend(send_bundle(client, b, kind, deadline));
        return out;
    }
    match resp.transport {
        Transport::Status(200..=299) => match split_bundle_response(&resp, chunk.len()) {
            // An entry that lost a race (409) or a version precondition (412) is sent again on
            // its own, where send_one resolves it.
            Some(parts) => parts
                .into_iter()
                .zip(chunk)
                .map(|(part, r)| match (part.transport.clone(), &r.create) {
                    (Transport::Status(409), _) => send_one(client, r),
                    (Transport::Status(412), _) if r.if_match.is_some() => send_one(client, r),
                    (Transport::Status(200), Some(c)) => {
                        let done = after_create(client, r, c, part);
                        with_id(client, r, done)
                    }
                    _ => with_id(client, r, part),
                })
                .collect(),
            None => {
                let mut broken = resp.clone();
                broken.transport = Transport::Broken;
                broken.error = Some("the server's Bundle response could not be read".into());
                vec![broken; chunk.len()]
            }
        },
        Transport::Status(400..=499)
            if kind == BundleType::Transaction
                && !matches!(resp.transport, Transport::Status(401 | 403 | 408 | 429)) =>
        {
            chunk.iter().map(|r| send_one(client, r)).collect()
        }
        _ => vec![resp; chunk.len()],
    }
}

/// Why a Bundle is sent again in halves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Split {
    /// The server said it is too large.
    Refused,
    /// No answer in time (or the connection broke): a smaller one may get through.
    TimedOut,
}

fn split_reason(resp: &Response) -> Option<Split> {
    match resp.transport {
        Transport::Broken => Some(Split::TimedOut),
        Transport::Status(413) => Some(Split::Refused),
        Transport::Status(400 | 422) => {
            let outcome = crate::response::operation_outcome(resp)?;
            let issues = outcome.get("issue")?.as_array()?;
            issues
                .iter()
                .any(|i| {
                    let code = i.get("code").and_then(|c| c.as_str()).unwrap_or("");
                    let diag = i
                        .get("diagnostics")
                        .and_then(|d| d.as_str())
                        .unwrap_or("")
                        .to_ascii_lowercase();
                    matches!(code, "too-costly" | "too-long")
                        || diag.contains("too large")
                        || diag.contains("too many")
                })
                .then_some(Split::Refused)
        }
        _ => None,
    }
}

/// The Bundle as JSON bytes, written entry by entry: the resources are serialised in place, not
/// copied into a Bundle value first (a batch is hundreds of resources).
fn bundle_bytes(chunk: &[Outgoing], kind: BundleType) -> Vec<u8> {
    let kind_name = match kind {
        BundleType::Batch => "batch",
        BundleType::Transaction => "transaction",
    };
    let mut out = Vec::with_capacity(chunk.len() * 1024);
    out.extend_from_slice(br#"{"resourceType":"Bundle","type":""#);
    out.extend_from_slice(kind_name.as_bytes());
    out.extend_from_slice(br#"","entry":["#);
    for (i, r) in chunk.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let mut request = json!({"method": r.method.name(), "url": r.path});
        if let Some(v) = &r.if_match {
            request["ifMatch"] = Value::String(v.clone());
        }
        if let Some(c) = &r.create {
            request["ifNoneExist"] = Value::String(c.if_none_exist.clone());
        }
        out.extend_from_slice(br#"{"request":"#);
        serde_json::to_writer(&mut out, &request).expect("a Value always serialises");
        if let Some(b) = &r.body {
            out.extend_from_slice(br#","resource":"#);
            serde_json::to_writer(&mut out, b).expect("a Value always serialises");
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

/// The parts of a batch-response / transaction-response the worker reads. Resources and
/// outcomes stay raw (their bytes are found, not parsed into values): a delivered entry needs
/// three of its resource's fields, a failed one its bytes for the dead-letter table.
#[derive(serde::Deserialize)]
struct ReplyBundle<'a> {
    #[serde(borrow)]
    entry: Vec<ReplyEntry<'a>>,
}

#[derive(serde::Deserialize)]
struct ReplyEntry<'a> {
    response: ReplyResponse<'a>,
    #[serde(borrow, default)]
    resource: Option<&'a serde_json::value::RawValue>,
}

#[derive(serde::Deserialize)]
struct ReplyResponse<'a> {
    status: String,
    location: Option<String>,
    etag: Option<String>,
    #[serde(borrow, default)]
    outcome: Option<&'a serde_json::value::RawValue>,
}

/// What identifies a stored resource; every other field is skipped unread.
#[derive(serde::Deserialize)]
pub struct Stored {
    #[serde(rename = "resourceType")]
    pub resource_type: Option<String>,
    pub id: Option<String>,
    pub meta: Option<StoredMeta>,
}

#[derive(serde::Deserialize)]
pub struct StoredMeta {
    #[serde(rename = "versionId")]
    pub version_id: Option<String>,
}

/// One response per entry of a batch-response / transaction-response Bundle.
pub fn split_bundle_response(resp: &Response, n: usize) -> Option<Vec<Response>> {
    let reply: ReplyBundle = serde_json::from_slice(&resp.body).ok()?;
    if reply.entry.len() != n {
        return None;
    }
    reply
        .entry
        .into_iter()
        .map(|e| {
            let r = e.response;
            let status: u16 = r.status.split_whitespace().next()?.parse().ok()?;
            // A delivered entry needs only its id and version: carry them as a Location
            // (Type/id/_history/v) instead of the stored resource, which the worker would
            // parse once more. Failures keep their body (the OperationOutcome).
            let compact = e
                .resource
                .filter(|_| (200..300).contains(&status))
                .and_then(|raw| serde_json::from_str::<Stored>(raw.get()).ok())
                .and_then(|s| match (s.resource_type, s.id, s.meta?.version_id) {
                    (Some(t), Some(id), Some(v)) => Some(format!("{t}/{id}/_history/{v}")),
                    _ => None,
                });
            let body = match (&compact, e.resource.or(r.outcome)) {
                (None, Some(raw)) => raw.get().as_bytes().to_vec(),
                _ => Vec::new(),
            };
            Some(Response {
                transport: Transport::Status(status),
                body,
                etag: r.etag,
                location: compact.or(r.location),
                retry_after: None,
                elapsed: resp.elapsed,
                error: None,
            })
        })
        .collect()
}

/// Whether the rest of the batch should wait: the server is gone, refuses our credentials, or
/// asked us to slow down.
pub fn halts_sending(resp: &Response, is_delete: bool) -> bool {
    match classify(&resp.transport, is_delete) {
        Verdict::Pause(_) => true,
        Verdict::Retry(Class::Transient) => {
            resp.retry_after.is_some() || resp.transport == Transport::Status(429)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_sending_thread_that_panics_does_not_hang_the_worker() {
        let shared = Arc::new(Shared {
            requests: Vec::new(),
            units: Vec::new(),
            results: Vec::new(),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            grouping: Grouping {
                bundle_size: 0,
                bundle_type: BundleType::Batch,
                in_flight: 2,
                deadline: std::time::Instant::now() + Duration::from_secs(60),
                record_call: |_| {},
            },
        });
        let main = std::thread::current();
        for i in 0..2 {
            let (shared, main) = (shared.clone(), main.clone());
            crate::pool::run(move || {
                let _done = Done(&shared.done, main);
                if i == 0 {
                    panic!("a bug in a sending thread");
                }
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let flight = InFlight { shared, threads: 2 };
        std::thread::spawn(move || {
            flight.finish(&|| false);
            tx.send(()).unwrap();
        });
        // finish() parks the thread that started the sends; here that is the test thread, so
        // the unpark may go to it rather than to the helper: poll generously instead.
        assert!(
            rx.recv_timeout(Duration::from_secs(20)).is_ok(),
            "finish() returned although one sending thread panicked"
        );
    }

    fn resp(body: Value) -> Response {
        Response {
            transport: Transport::Status(200),
            body: serde_json::to_vec(&body).unwrap(),
            etag: None,
            location: None,
            retry_after: None,
            elapsed: Duration::from_millis(3),
            error: None,
        }
    }

    #[test]
    fn a_batch_response_splits_into_one_outcome_per_entry() {
        let r = resp(
            json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
                {"response": {"status": "201 Created", "location": "Patient/a/_history/1", "etag": "W/\"1\""},
                 "resource": {"resourceType": "Patient", "id": "a"}},
                {"response": {"status": "422 Unprocessable Entity",
                              "outcome": {"resourceType": "OperationOutcome", "issue": [{"severity": "error"}]}}},
            ]}),
        );
        let parts = split_bundle_response(&r, 2).unwrap();
        assert_eq!(parts[0].transport, Transport::Status(201));
        assert_eq!(parts[0].location.as_deref(), Some("Patient/a/_history/1"));
        assert_eq!(
            serde_json::from_slice::<Value>(&parts[0].body).unwrap()["id"],
            "a"
        );
        assert_eq!(parts[1].transport, Transport::Status(422));
        assert_eq!(
            serde_json::from_slice::<Value>(&parts[1].body).unwrap()["resourceType"],
            "OperationOutcome"
        );
    }

    #[test]
    fn a_bundle_is_written_with_every_entry_in_order() {
        let chunk = vec![
            Outgoing {
                method: Method::Put,
                path: "Patient?identifier=urn:s%7C1".into(),
                body: Some(
                    json!({"resourceType": "Patient", "name": [{"family": "Ünïcode \"q\""}]}),
                ),
                if_match: None,
                create: None,
            },
            Outgoing {
                method: Method::Put,
                path: "Patient/abc".into(),
                body: Some(json!({"resourceType": "Patient", "id": "abc"})),
                if_match: Some("W/\"4\"".into()),
                create: None,
            },
            Outgoing {
                method: Method::Delete,
                path: "Patient/gone".into(),
                body: None,
                if_match: None,
                create: None,
            },
        ];
        let v: Value =
            serde_json::from_slice(&bundle_bytes(&chunk, BundleType::Transaction)).unwrap();
        assert_eq!(
            v,
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"request": {"method": "PUT", "url": "Patient?identifier=urn:s%7C1"},
                 "resource": {"resourceType": "Patient", "name": [{"family": "Ünïcode \"q\""}]}},
                {"request": {"method": "PUT", "url": "Patient/abc", "ifMatch": "W/\"4\""},
                 "resource": {"resourceType": "Patient", "id": "abc"}},
                {"request": {"method": "DELETE", "url": "Patient/gone"}},
            ]})
        );
    }

    #[test]
    fn a_delivered_entry_keeps_its_id_and_version_but_not_its_body() {
        let r = resp(
            json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
                {"response": {"status": "200 OK", "etag": "W/\"7\""},
                 "resource": {"resourceType": "Patient", "id": "p1", "meta": {"versionId": "7"},
                              "name": [{"family": "Doe"}]}},
            ]}),
        );
        let parts = split_bundle_response(&r, 1).unwrap();
        assert_eq!(parts[0].location.as_deref(), Some("Patient/p1/_history/7"));
        assert!(parts[0].body.is_empty());
    }

    #[test]
    fn a_bundle_response_of_the_wrong_shape_is_refused() {
        assert!(split_bundle_response(&resp(json!({"entry": []})), 2).is_none());
        assert!(split_bundle_response(
            &resp(json!({"entry": [{"response": {"status": "OK"}}]})),
            1
        )
        .is_none());
        let mut garbage = resp(json!(null));
        garbage.body = b"<html>".to_vec();
        assert!(split_bundle_response(&garbage, 1).is_none());
    }
}
