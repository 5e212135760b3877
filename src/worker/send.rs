//! Send: the HTTP requests of one tier of a batch, up to fhir_sync.max_in_flight at once.
//!
//! Runs with no transaction open. The extra threads do HTTP only (no PostgreSQL calls) and
//! block all signals, so PostgreSQL's handlers keep running on the worker's main thread.
//! Each request is for a different resource (the claim guarantees it), so concurrency never
//! puts two requests for one resource in flight.

use super::policy::{classify, Class, Transport, Verdict, CONFLICT_RESENDS};
use crate::http::{Client, Method, Response};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

pub struct Outgoing {
    pub method: Method,
    pub path: String,
    pub body: Option<Vec<u8>>,
}

/// Sends every request; `None` for those not sent because the server asked the worker to stop
/// (unreachable, credentials rejected, throttled) before their turn.
pub fn send_all(client: &Client, requests: &[Outgoing], in_flight: usize) -> Vec<Option<Response>> {
    let results: Vec<Mutex<Option<Response>>> = requests.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let work = || loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let i = next.fetch_add(1, Ordering::AcqRel);
        let Some(req) = requests.get(i) else { return };
        let resp = send_one(client, req);
        if halts_sending(&resp, req.method == Method::Delete) {
            stop.store(true, Ordering::Release);
        }
        *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(resp);
    };
    let threads = in_flight.min(requests.len()).max(1);
    if threads == 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(|| {
                    block_signals();
                    work()
                });
            }
            work();
        });
    }
    results
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect()
}

fn send_one(client: &Client, req: &Outgoing) -> Response {
    let mut resp = client.request(req.method, &req.path, req.body.as_deref());
    // A 409 on a conditional update means a concurrent write won the race; the resource we
    // send is still the latest, so send it again at once.
    let mut resends = 0;
    while resp.transport == Transport::Status(409) && resends < CONFLICT_RESENDS {
        resends += 1;
        resp = client.request(req.method, &req.path, req.body.as_deref());
    }
    resp
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

fn block_signals() {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
