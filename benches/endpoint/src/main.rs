//! fhir-bench-endpoint: a fast local FHIR endpoint for fhir_sync's benchmarks.
//!
//! It answers what the worker sends — conditional `PUT /<Type>?identifier=system|value`,
//! `PUT /<Type>/<id>`, `DELETE` (conditional or by id), and `POST /` of a `batch` or
//! `transaction` Bundle — like a FHIR server would (ids, versions, Location, ETag), without
//! storing resources (only id, version and deleted per identifier). For every write (each
//! Bundle entry counts as one) it records the arrival time (CLOCK_REALTIME, µs since the epoch)
//! and the identifier, and it tracks how many requests are in flight per identifier, so a
//! benchmark can compute commit → arrival latency and check that the worker never had two
//! requests in flight for one resource.
//!
//! ```text
//! fhir-bench-endpoint [--port N] [--delay-ms N] [--record FILE] [--base-path /fhir] [--quiet]
//! ```
//!
//! Prints `listening 127.0.0.1:<port>` on stdout once it accepts connections (`--port 0`: any
//! free port). HTTP/1.1 with keep-alive, one thread per connection.
//!
//! Control endpoints (outside the FHIR space, at the server root):
//! - `GET /_stats[?arrivals=0][&since=N]`: counters, in-flight overlaps, and the arrival list
//!   `[[t_us, "PUT"|"DELETE", "<Type>", "<system>|<value>"], ...]` (from index N).
//! - `POST /_reset[?store=1]`: clears the counters and arrivals (and the resource store).
//! - `POST /_dump[?file=PATH]`: writes the `/_stats` document to `--record FILE` (or PATH).
//! - `POST /_config?delay_ms=N`: changes the per-request delay.
//! - `GET /metadata`: a small CapabilityStatement (fhir_sync probes it when the server was down).
//!
//! SIGTERM / SIGINT: writes the `--record` file (if given) and exits 0.

use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 256 << 20;

// ------------------------------------------------------------------------------------- state

struct Resource {
    id: String,
    version: u64,
    deleted: bool,
}

#[derive(Default)]
struct Store {
    /// "<Type>\0<system>|<value>" → resource
    by_ident: HashMap<String, Resource>,
    /// "<Type>/<id>" → "<Type>\0<system>|<value>"
    by_id: HashMap<String, String>,
    next_id: u64,
}

struct Arrival {
    us: i64,
    method: &'static str,
    rtype: String,
    ident: String,
}

#[derive(Default)]
struct Stats {
    requests: u64,
    writes: u64,
    puts: u64,
    deletes: u64,
    bundles: u64,
    created: u64,
    updated: u64,
    errors: u64,
    connections: u64,
    arrivals: Vec<Arrival>,
    /// identifier → requests in flight (arrival until the response is written)
    inflight: HashMap<String, u32>,
    max_inflight_per_identifier: u32,
    /// Requests that arrived while another request for the same identifier was in flight.
    overlaps: u64,
    overlap_examples: Vec<String>,
    /// The same identifier twice or more in one Bundle.
    duplicates_in_bundle: u64,
    requests_in_flight: u32,
    max_requests_in_flight: u32,
    first_write_us: Option<i64>,
    last_write_us: Option<i64>,
}

struct State {
    store: Store,
    stats: Stats,
}

struct Shared {
    state: Mutex<State>,
    delay_ms: AtomicU64,
    record: Option<String>,
    base_path: String,
    port: u16,
    quiet: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}{}", self.port, self.base_path)
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// RFC 3339 UTC timestamp of a µs epoch time (FHIR instant).
fn instant(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // civil_from_days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}+00:00",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        micros / 1000
    )
}

// ------------------------------------------------------------------------------------- HTTP

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(status: u16, v: &Value) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type", "application/fhir+json".into())],
            body: serde_json::to_vec(v).unwrap_or_default(),
        }
    }
    fn empty(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }
    fn outcome(status: u16, code: &str, text: &str) -> Reply {
        Reply::json(status, &outcome(code, text))
    }
}

fn outcome(code: &str, text: &str) -> Value {
    json!({"resourceType": "OperationOutcome",
           "issue": [{"severity": "error", "code": code, "details": {"text": text}}]})
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

enum ReadError {
    Closed,
    Bad(u16, &'static str),
}

fn read_line(
    r: &mut BufReader<TcpStream>,
    buf: &mut Vec<u8>,
    budget: &mut usize,
) -> Result<(), ReadError> {
    buf.clear();
    let n = r
        .by_ref()
        .take(*budget as u64 + 1)
        .read_until(b'\n', buf)
        .map_err(|_| ReadError::Closed)?;
    if n == 0 {
        return Err(ReadError::Closed);
    }
    if n > *budget {
        return Err(ReadError::Bad(431, "request head too large"));
    }
    *budget -= n;
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(())
}

fn read_request(r: &mut BufReader<TcpStream>) -> Result<Request, ReadError> {
    let mut budget = MAX_HEAD;
    let mut line = Vec::with_capacity(256);
    // Tolerate stray empty lines between requests (RFC 9112 §2.2).
    loop {
        read_line(r, &mut line, &mut budget)?;
        if !line.is_empty() {
            break;
        }
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadError::Bad(400, "malformed request line"));
    };
    let (method, target, version) = (method.to_string(), target.to_string(), version.to_string());
    let mut headers = Vec::new();
    loop {
        read_line(r, &mut line, &mut budget)?;
        if line.is_empty() {
            break;
        }
        let h = String::from_utf8_lossy(&line);
        let Some((k, v)) = h.split_once(':') else {
            return Err(ReadError::Bad(400, "malformed header"));
        };
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut req = Request {
        method,
        target,
        headers,
        body: Vec::new(),
        keep_alive: true,
    };
    let conn = req.header("connection").map(|c| c.to_ascii_lowercase());
    req.keep_alive = if version == "HTTP/1.0" {
        conn.as_deref() == Some("keep-alive")
    } else {
        conn.as_deref() != Some("close")
    };
    if req
        .header("expect")
        .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
    {
        let _ = r.get_mut().write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let mut b = MAX_HEAD;
            read_line(r, &mut line, &mut b)?;
            let size_text = String::from_utf8_lossy(&line);
            let size_text = size_text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| ReadError::Bad(400, "bad chunk size"))?;
            if size == 0 {
                // trailers
                loop {
                    read_line(r, &mut line, &mut b)?;
                    if line.is_empty() {
                        break;
                    }
                }
                break;
            }
            if req.body.len() + size > MAX_BODY {
                return Err(ReadError::Bad(413, "body too large"));
            }
            let start = req.body.len();
            req.body.resize(start + size, 0);
            r.read_exact(&mut req.body[start..])
                .map_err(|_| ReadError::Closed)?;
            read_line(r, &mut line, &mut b)?;
        }
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| ReadError::Bad(400, "bad content-length"))?;
        if len > MAX_BODY {
            return Err(ReadError::Bad(413, "body too large"));
        }
        req.body.resize(len, 0);
        r.read_exact(&mut req.body).map_err(|_| ReadError::Closed)?;
    }
    Ok(req)
}

fn write_reply(stream: &mut TcpStream, reply: &Reply, keep_alive: bool) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(reply.body.len() + 256);
    write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        reply.status,
        reason(reply.status)
    )?;
    for (k, v) in &reply.headers {
        write!(out, "{k}: {v}\r\n")?;
    }
    write!(out, "Content-Length: {}\r\n", reply.body.len())?;
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&reply.body);
    stream.write_all(&out)
}

fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(600)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    shared.lock().stats.connections += 1;
    loop {
        let req = match read_request(&mut reader) {
            Ok(r) => r,
            Err(ReadError::Closed) => return,
            Err(ReadError::Bad(status, text)) => {
                let _ = write_reply(&mut writer, &Reply::outcome(status, "invalid", text), false);
                return;
            }
        };
        let keep_alive = req.keep_alive;
        let reply = handle(&shared, req);
        if write_reply(&mut writer, &reply, keep_alive).is_err() || !keep_alive {
            return;
        }
    }
}

// ------------------------------------------------------------------------------------- FHIR

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Undoes FHIR search-token escaping (`\,` `\|` `\$` `\\`).
fn unescape_token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

/// A FHIR interaction target, relative to the base: Type?query, Type/id, or the base itself.
enum Target {
    Base,
    Conditional { rtype: String, ident: String },
    ById { rtype: String, id: String },
    Other,
}

fn parse_target(path: &str, query: &str) -> Target {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        [] => Target::Base,
        [t] => match query_param(query, "identifier") {
            Some(token) => Target::Conditional {
                rtype: t.to_string(),
                ident: unescape_token(&token),
            },
            None => Target::Other,
        },
        [t, id] => Target::ById {
            rtype: t.to_string(),
            id: percent_decode(id),
        },
        _ => Target::Other,
    }
}

/// Splits a request target or a Bundle entry url into (path relative to the FHIR base, query).
fn split_url<'a>(shared: &Shared, url: &'a str) -> (&'a str, &'a str) {
    let mut u = url;
    if let Some(rest) = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))
    {
        u = rest.find('/').map(|i| &rest[i..]).unwrap_or("/");
    }
    let (path, query) = u.split_once('?').unwrap_or((u, ""));
    let path = path.strip_prefix(shared.base_path.as_str()).unwrap_or(path);
    (path, query)
}

/// One write as the store sees it.
enum Op {
    Put {
        target: Target,
        resource: Value,
        /// The version the write is conditional on (If-Match, or a Bundle entry's ifMatch):
        /// 412 unless it is the current one, as tests/e2e/harness/faults.py answers.
        if_match: Option<String>,
    },
    Delete { target: Target },
}

struct Outcome {
    status: u16,
    rtype: String,
    id: Option<String>,
    version: u64,
    resource: Option<Value>,
    error: Option<Value>,
}

impl Outcome {
    fn fail(status: u16, code: &str, text: &str) -> Outcome {
        Outcome {
            status,
            rtype: String::new(),
            id: None,
            version: 0,
            resource: None,
            error: Some(outcome(code, text)),
        }
    }
}

fn ident_of_resource(r: &Value) -> Option<String> {
    let i = r.get("identifier")?.as_array()?.first()?;
    let v = i.get("value")?.as_str()?;
    Some(match i.get("system").and_then(|s| s.as_str()) {
        Some(s) => format!("{s}|{v}"),
        None => v.to_string(),
    })
}

/// The identifier a write is about (for arrivals and in-flight tracking).
fn op_identity(store: &Store, op: &Op) -> (&'static str, String, String) {
    let (method, target, resource) = match op {
        Op::Put {
            target, resource, ..
        } => ("PUT", target, Some(resource)),
        Op::Delete { target } => ("DELETE", target, None),
    };
    match target {
        Target::Conditional { rtype, ident } => (method, rtype.clone(), ident.clone()),
        Target::ById { rtype, id } => {
            let key = format!("{rtype}/{id}");
            let ident = store
                .by_id
                .get(&key)
                .and_then(|k| k.split_once('\0').map(|(_, i)| i.to_string()))
                .or_else(|| resource.and_then(ident_of_resource))
                .unwrap_or_else(|| format!("id:{key}"));
            (method, rtype.clone(), ident)
        }
        _ => (method, String::new(), String::new()),
    }
}

/// Checks a write before anything is applied (a transaction applies all or nothing).
fn validate(op: &Op) -> Result<(), Box<Outcome>> {
    match op {
        Op::Put {
            target, resource, ..
        } => {
            let rtype = match target {
                Target::Conditional { rtype, .. } | Target::ById { rtype, .. } => rtype,
                Target::Base | Target::Other => {
                    return Err(Box::new(Outcome::fail(
                        400,
                        "invalid",
                        "PUT needs <Type>?identifier= or <Type>/<id>",
                    )))
                }
            };
            if let Target::Conditional { ident, .. } = target {
                if ident.is_empty() {
                    return Err(Box::new(Outcome::fail(400, "invalid", "empty identifier")));
                }
            }
            let Some(obj) = resource.as_object() else {
                return Err(Box::new(Outcome::fail(
                    400,
                    "invalid",
                    "the body is not a JSON object",
                )));
            };
            if obj.get("resourceType").and_then(|t| t.as_str()) != Some(rtype.as_str()) {
                return Err(Box::new(Outcome::fail(
                    400,
                    "invalid",
                    "resourceType does not match the URL",
                )));
            }
            if let Target::ById { id, .. } = target {
                if let Some(bid) = obj.get("id").and_then(|i| i.as_str()) {
                    if bid != id {
                        return Err(Box::new(Outcome::fail(
                            400,
                            "invalid",
                            "Resource ID in body does not match URL",
                        )));
                    }
                }
            }
            Ok(())
        }
        Op::Delete { target } => match target {
            Target::Conditional { .. } | Target::ById { .. } => Ok(()),
            _ => Err(Box::new(Outcome::fail(
                400,
                "invalid",
                "DELETE needs <Type>?identifier= or <Type>/<id>",
            ))),
        },
    }
}

fn apply(store: &mut Store, stats: &mut Stats, op: Op, now: i64) -> Outcome {
    match op {
        Op::Put {
            target,
            mut resource,
            if_match,
        } => {
            let (rtype, key, by_id) = match &target {
                Target::Conditional { rtype, ident } => {
                    (rtype.clone(), format!("{rtype}\0{ident}"), None)
                }
                Target::ById { rtype, id } => {
                    let k = store.by_id.get(&format!("{rtype}/{id}")).cloned();
                    let k = k.unwrap_or_else(|| {
                        let ident = ident_of_resource(&resource)
                            .unwrap_or_else(|| format!("id:{rtype}/{id}"));
                        format!("{rtype}\0{ident}")
                    });
                    (rtype.clone(), k, Some(id.clone()))
                }
                _ => unreachable!("validated"),
            };
            if let Some(expected) = if_match {
                let current = store
                    .by_ident
                    .get(&key)
                    .filter(|r| !r.deleted)
                    .map(|r| r.version.to_string());
                let wanted = expected.trim().trim_start_matches("W/").trim_matches('"');
                if current.as_deref() != Some(wanted) {
                    return Outcome::fail(
                        412,
                        "conflict",
                        &format!("If-Match {expected} does not match version {current:?}"),
                    );
                }
            }
            store.next_id += 1;
            let fresh = format!("{:016x}", store.next_id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let (status, id, version) = match store.by_ident.get_mut(&key) {
                Some(r) if !r.deleted => {
                    r.version += 1;
                    (200, r.id.clone(), r.version)
                }
                Some(r) => {
                    // A conditional PUT after a delete creates a new resource (as Helios does);
                    // a PUT by id revives the old one with the next version.
                    if let Some(id) = by_id {
                        r.id = id;
                        r.version += 1;
                    } else {
                        r.id = fresh;
                        r.version = 1;
                    }
                    r.deleted = false;
                    (201, r.id.clone(), r.version)
                }
                None => {
                    let id = by_id.unwrap_or(fresh);
                    store.by_ident.insert(
                        key.clone(),
                        Resource {
                            id: id.clone(),
                            version: 1,
                            deleted: false,
                        },
                    );
                    (201, id, 1)
                }
            };
            store.by_id.insert(format!("{rtype}/{id}"), key);
            if status == 201 {
                stats.created += 1;
            } else {
                stats.updated += 1;
            }
            if let Some(obj) = resource.as_object_mut() {
                obj.insert("id".into(), Value::String(id.clone()));
                let mut meta = Map::new();
                meta.insert("versionId".into(), Value::String(version.to_string()));
                meta.insert("lastUpdated".into(), Value::String(instant(now)));
                obj.insert("meta".into(), Value::Object(meta));
            }
            Outcome {
                status,
                rtype,
                id: Some(id),
                version,
                resource: Some(resource),
                error: None,
            }
        }
        Op::Delete { target } => {
            let key = match &target {
                Target::Conditional { rtype, ident } => Some(format!("{rtype}\0{ident}")),
                Target::ById { rtype, id } => store.by_id.get(&format!("{rtype}/{id}")).cloned(),
                _ => unreachable!("validated"),
            };
            let live = key
                .as_ref()
                .and_then(|k| store.by_ident.get_mut(k))
                .filter(|r| !r.deleted);
            match (live, &target) {
                (Some(r), _) => {
                    r.deleted = true;
                    r.version += 1;
                }
                // DELETE of an unknown or already deleted id: 404, as Helios answers (the worker
                // treats it as success); a conditional DELETE with no match is a 204.
                (None, Target::ById { .. }) => {
                    return Outcome::fail(404, "not-found", "no such resource");
                }
                (None, _) => {}
            }
            Outcome {
                status: 204,
                rtype: String::new(),
                id: None,
                version: 0,
                resource: None,
                error: None,
            }
        }
    }
}

/// Records arrivals and in-flight identifiers of one request's writes. Returns the identifiers
/// to release once the response is ready.
fn arrive(stats: &mut Stats, writes: &[(&'static str, String, String)], now: i64) -> Vec<String> {
    stats.writes += writes.len() as u64;
    stats.requests_in_flight += 1;
    stats.max_requests_in_flight = stats.max_requests_in_flight.max(stats.requests_in_flight);
    if !writes.is_empty() {
        stats.first_write_us.get_or_insert(now);
        stats.last_write_us = Some(now);
    }
    let mut held: Vec<String> = Vec::with_capacity(writes.len());
    for (method, rtype, ident) in writes {
        if *method == "PUT" {
            stats.puts += 1;
        } else {
            stats.deletes += 1;
        }
        stats.arrivals.push(Arrival {
            us: now,
            method,
            rtype: rtype.clone(),
            ident: ident.clone(),
        });
        let key = format!("{rtype}\0{ident}");
        if held.contains(&key) {
            stats.duplicates_in_bundle += 1;
            continue;
        }
        let n = stats.inflight.entry(key.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            stats.overlaps += 1;
            if stats.overlap_examples.len() < 20 {
                stats.overlap_examples.push(format!("{rtype}|{ident}"));
            }
        }
        stats.max_inflight_per_identifier = stats.max_inflight_per_identifier.max(*n);
        held.push(key);
    }
    held
}

fn depart(stats: &mut Stats, held: Vec<String>) {
    stats.requests_in_flight = stats.requests_in_flight.saturating_sub(1);
    for key in held {
        if let Some(n) = stats.inflight.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                stats.inflight.remove(&key);
            }
        }
    }
}

fn delay(shared: &Shared) {
    let d = shared.delay_ms.load(Ordering::Relaxed);
    if d > 0 {
        std::thread::sleep(Duration::from_millis(d));
    }
}

fn handle(shared: &Shared, req: Request) -> Reply {
    let now = now_us();
    let (raw_path, raw_query) = req
        .target
        .split_once('?')
        .unwrap_or((req.target.as_str(), ""));
    // Control endpoints, at the server root whatever the FHIR base path.
    match (req.method.as_str(), raw_path) {
        ("GET", "/_stats") => return Reply::json(200, &stats_json(shared, raw_query)),
        ("POST", "/_reset") => {
            let mut st = shared.lock();
            st.stats = Stats::default();
            if query_param(raw_query, "store").as_deref() == Some("1") {
                // Forgets the resources but not the ids handed out: a server never gives a new
                // resource an id it gave before (fhir_sync dead-letters a first write that comes
                // back with the id of a resource another row maps to).
                let next_id = st.store.next_id;
                st.store = Store {
                    next_id,
                    ..Store::default()
                };
            }
            return Reply::json(200, &json!({"reset": true}));
        }
        ("POST", "/_dump") => {
            let file = query_param(raw_query, "file").or_else(|| shared.record.clone());
            return match file {
                Some(f) => match dump(shared, &f) {
                    Ok(n) => Reply::json(200, &json!({"file": f, "arrivals": n})),
                    Err(e) => Reply::outcome(500, "exception", &e.to_string()),
                },
                None => Reply::outcome(400, "invalid", "no --record file and no ?file="),
            };
        }
        ("POST", "/_config") => {
            if let Some(d) = query_param(raw_query, "delay_ms").and_then(|d| d.parse().ok()) {
                shared.delay_ms.store(d, Ordering::Relaxed);
            }
            return Reply::json(
                200,
                &json!({"delay_ms": shared.delay_ms.load(Ordering::Relaxed)}),
            );
        }
        ("GET", "/_health") => return Reply::json(200, &json!({"status": "ok"})),
        _ => {}
    }
    // Counted: FHIR requests only, not the control endpoints above.
    shared.lock().stats.requests += 1;
    let (path, query) = split_url(shared, &req.target);
    let target = parse_target(path, query);
    let result = match (req.method.as_str(), target) {
        ("GET", Target::Other) if path.trim_matches('/') == "metadata" => {
            return Reply::json(
                200,
                &json!({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                        "fhirVersion": "4.0.1", "format": ["json"],
                        "software": {"name": "fhir-bench-endpoint"}}),
            )
        }
        ("POST", Target::Base) => bundle(shared, &req.body, now),
        ("PUT", target @ (Target::Conditional { .. } | Target::ById { .. })) => {
            match serde_json::from_slice::<Value>(&req.body) {
                Ok(resource) => single(
                    shared,
                    Op::Put {
                        target,
                        resource,
                        if_match: req.header("If-Match").map(str::to_string),
                    },
                    now,
                ),
                Err(e) => Err(Reply::outcome(400, "invalid", &format!("Invalid JSON: {e}"))),
            }
        }
        ("DELETE", target @ (Target::Conditional { .. } | Target::ById { .. })) => {
            single(shared, Op::Delete { target }, now)
        }
        (m, _) => Err(Reply::outcome(
            if matches!(m, "GET" | "PUT" | "DELETE" | "POST") { 404 } else { 405 },
            "not-supported",
            "fhir-bench-endpoint answers conditional PUT/DELETE, PUT/DELETE by id and POST of a Bundle",
        )),
    };
    match result {
        Ok(r) => r,
        Err(r) => {
            shared.lock().stats.errors += 1;
            r
        }
    }
}

fn single(shared: &Shared, op: Op, now: i64) -> Result<Reply, Reply> {
    if let Err(o) = validate(&op) {
        return Err(Reply::json(
            o.status,
            o.error.as_ref().unwrap_or(&Value::Null),
        ));
    }
    let held = {
        let mut st = shared.lock();
        let w = op_identity(&st.store, &op);
        arrive(&mut st.stats, &[w], now)
    };
    delay(shared);
    let out = {
        let mut guard = shared.lock();
        let st = &mut *guard;
        let out = apply(&mut st.store, &mut st.stats, op, now_us());
        depart(&mut st.stats, held);
        out
    };
    if let Some(e) = &out.error {
        return Err(Reply::json(out.status, e));
    }
    let mut reply = match &out.resource {
        Some(r) => Reply::json(out.status, r),
        None => Reply::empty(out.status),
    };
    if let Some(id) = &out.id {
        reply
            .headers
            .push(("ETag", format!("W/\"{}\"", out.version)));
        reply.headers.push((
            "Location",
            format!(
                "{}/{}/{}/_history/{}",
                shared.base_url(),
                out.rtype,
                id,
                out.version
            ),
        ));
    }
    Ok(reply)
}

fn bundle(shared: &Shared, body: &[u8], now: i64) -> Result<Reply, Reply> {
    let b: Value = serde_json::from_slice(body)
        .map_err(|e| Reply::outcome(400, "invalid", &format!("Invalid JSON: {e}")))?;
    if b.get("resourceType").and_then(|t| t.as_str()) != Some("Bundle") {
        return Err(Reply::outcome(
            400,
            "invalid",
            "POST to the base needs a Bundle",
        ));
    }
    let transaction = match b.get("type").and_then(|t| t.as_str()) {
        Some("batch") => false,
        Some("transaction") => true,
        _ => {
            return Err(Reply::outcome(
                400,
                "invalid",
                "Bundle.type must be batch or transaction",
            ))
        }
    };
    let Value::Object(mut b) = b else {
        unreachable!()
    };
    let entries = match b.remove("entry") {
        Some(Value::Array(a)) => a,
        None => Vec::new(),
        Some(_) => {
            return Err(Reply::outcome(
                400,
                "invalid",
                "Bundle.entry must be an array",
            ))
        }
    };
    // Parse every entry first: a transaction is all or nothing.
    let mut ops: Vec<Result<Op, Box<Outcome>>> = Vec::with_capacity(entries.len());
    for mut e in entries {
        let method = e
            .pointer("/request/method")
            .and_then(|m| m.as_str())
            .unwrap_or("")
            .to_string();
        let url = e
            .pointer("/request/url")
            .and_then(|m| m.as_str())
            .unwrap_or("")
            .to_string();
        let (path, query) = split_url(shared, &url);
        let target = parse_target(path, query);
        let op = match method.as_str() {
            "PUT" => match e.get_mut("resource").map(Value::take) {
                Some(resource) => Ok(Op::Put {
                    target,
                    resource,
                    if_match: e
                        .pointer("/request/ifMatch")
                        .and_then(|m| m.as_str())
                        .map(str::to_string),
                }),
                None => Err(Box::new(Outcome::fail(
                    400,
                    "invalid",
                    "PUT entry without a resource",
                ))),
            },
            "DELETE" => Ok(Op::Delete { target }),
            _ => Err(Box::new(Outcome::fail(
                400,
                "not-supported",
                "entry method must be PUT or DELETE",
            ))),
        };
        ops.push(op.and_then(|op| validate(&op).map(|_| op)));
    }
    if transaction {
        if let Some(bad) = ops.iter().find_map(|o| o.as_ref().err()) {
            return Err(Reply::json(
                bad.status,
                bad.error.as_ref().unwrap_or(&Value::Null),
            ));
        }
    }
    let held = {
        let mut st = shared.lock();
        st.stats.bundles += 1;
        let writes: Vec<_> = ops
            .iter()
            .filter_map(|o| o.as_ref().ok())
            .map(|op| op_identity(&st.store, op))
            .collect();
        arrive(&mut st.stats, &writes, now)
    };
    delay(shared);
    let outcomes: Vec<Outcome> = {
        let mut guard = shared.lock();
        let st = &mut *guard;
        let t = now_us();
        let outs = ops
            .into_iter()
            .map(|o| match o {
                Ok(op) => apply(&mut st.store, &mut st.stats, op, t),
                Err(e) => *e,
            })
            .collect();
        depart(&mut st.stats, held);
        outs
    };
    if transaction {
        if let Some(bad) = outcomes.iter().find(|o| o.error.is_some()) {
            // Only a DELETE by unknown id can fail here; a real server would roll back.
            return Err(Reply::json(
                bad.status,
                bad.error.as_ref().unwrap_or(&Value::Null),
            ));
        }
    }
    let base = shared.base_url();
    let entries: Vec<Value> = outcomes
        .into_iter()
        .map(|o| {
            let mut response = Map::new();
            response.insert(
                "status".into(),
                Value::String(format!("{} {}", o.status, reason(o.status))),
            );
            let mut entry = Map::new();
            if let Some(id) = &o.id {
                response.insert(
                    "location".into(),
                    Value::String(format!("{}/{}/_history/{}", o.rtype, id, o.version)),
                );
                response.insert("etag".into(), Value::String(format!("W/\"{}\"", o.version)));
                entry.insert(
                    "fullUrl".into(),
                    Value::String(format!("{base}/{}/{id}", o.rtype)),
                );
            }
            if let Some(e) = o.error {
                response.insert("outcome".into(), e);
            }
            if let Some(r) = o.resource {
                entry.insert("resource".into(), r);
            }
            entry.insert("response".into(), Value::Object(response));
            Value::Object(entry)
        })
        .collect();
    let kind = if transaction {
        "transaction-response"
    } else {
        "batch-response"
    };
    Ok(Reply::json(
        200,
        &json!({"resourceType": "Bundle", "type": kind, "entry": entries}),
    ))
}

// ------------------------------------------------------------------------------------- stats

fn stats_json(shared: &Shared, query: &str) -> Value {
    let with_arrivals = query_param(query, "arrivals").as_deref() != Some("0");
    let since: usize = query_param(query, "since")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let st = shared.lock();
    let s = &st.stats;
    let arrivals: Vec<Value> = if with_arrivals {
        s.arrivals
            .iter()
            .skip(since)
            .map(|a| json!([a.us, a.method, a.rtype, a.ident]))
            .collect()
    } else {
        Vec::new()
    };
    json!({
        "requests": s.requests,
        "writes": s.writes,
        "puts": s.puts,
        "deletes": s.deletes,
        "bundles": s.bundles,
        "created": s.created,
        "updated": s.updated,
        "errors": s.errors,
        "connections": s.connections,
        "resources": st.store.by_ident.len(),
        "max_inflight_per_identifier": s.max_inflight_per_identifier,
        "overlaps": s.overlaps,
        "overlap_examples": s.overlap_examples,
        "duplicates_in_bundle": s.duplicates_in_bundle,
        "max_requests_in_flight": s.max_requests_in_flight,
        "first_write_us": s.first_write_us,
        "last_write_us": s.last_write_us,
        "delay_ms": shared.delay_ms.load(Ordering::Relaxed),
        "arrivals_total": s.arrivals.len(),
        "arrivals_since": since,
        "arrivals": arrivals,
    })
}

fn dump(shared: &Shared, file: &str) -> std::io::Result<usize> {
    let doc = stats_json(shared, "");
    let n = doc["arrivals"].as_array().map(|a| a.len()).unwrap_or(0);
    let tmp = format!("{file}.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&doc)?)?;
    std::fs::rename(&tmp, file)?;
    Ok(n)
}

// ------------------------------------------------------------------------------------- main

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: i32) {
    TERMINATE.store(true, Ordering::SeqCst);
}

extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
}

fn usage() -> ! {
    eprintln!("usage: fhir-bench-endpoint [--port N] [--delay-ms N] [--record FILE] [--base-path /fhir] [--quiet]");
    std::process::exit(2)
}

fn main() {
    let mut port: u16 = 8090;
    let mut delay_ms: u64 = 0;
    let mut record = None;
    let mut base_path = String::new();
    let mut quiet = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--port" => port = val().parse().unwrap_or_else(|_| usage()),
            "--delay-ms" => delay_ms = val().parse().unwrap_or_else(|_| usage()),
            "--record" => record = Some(val()),
            "--base-path" => {
                base_path = format!("/{}", val().trim_matches('/'))
                    .trim_end_matches('/')
                    .to_string()
            }
            "--quiet" => quiet = true,
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| {
        eprintln!("fhir-bench-endpoint: cannot listen on 127.0.0.1:{port}: {e}");
        std::process::exit(1)
    });
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            store: Store::default(),
            stats: Stats::default(),
        }),
        delay_ms: AtomicU64::new(delay_ms),
        record,
        base_path,
        port,
        quiet,
    });
    unsafe {
        signal(15, on_signal);
        signal(2, on_signal);
    }
    {
        let shared = shared.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(20));
            if TERMINATE.load(Ordering::SeqCst) {
                if let Some(f) = &shared.record {
                    match dump(&shared, f) {
                        Ok(n) if !shared.quiet => {
                            eprintln!("fhir-bench-endpoint: {n} arrivals written to {f}")
                        }
                        Ok(_) => {}
                        Err(e) => eprintln!("fhir-bench-endpoint: cannot write {f}: {e}"),
                    }
                }
                std::process::exit(0);
            }
        });
    }
    println!("listening 127.0.0.1:{port}");
    let _ = std::io::stdout().flush();
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let shared = shared.clone();
                let _ = std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || serve(s, shared));
            }
            Err(e) => {
                if !shared.quiet {
                    eprintln!("fhir-bench-endpoint: accept: {e}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(target: Target, if_match: Option<&str>) -> Op {
        Op::Put {
            target,
            resource: json!({"resourceType": "Patient",
                             "identifier": [{"system": "urn:mrn", "value": "7"}]}),
            if_match: if_match.map(str::to_string),
        }
    }

    /// The fault server's semantics (tests/e2e/harness/faults.py): a PUT conditional on a version
    /// that is not the current one is refused with 412, and changes nothing.
    #[test]
    fn a_stale_if_match_is_refused_and_a_current_one_applies() {
        let (mut store, mut stats) = (Store::default(), Stats::default());
        let cond = || Target::Conditional {
            rtype: "Patient".into(),
            ident: "urn:mrn|7".into(),
        };
        let created = apply(&mut store, &mut stats, put(cond(), None), 0);
        assert_eq!((created.status, created.version), (201, 1));
        let id = created.id.unwrap();
        let by_id = || Target::ById {
            rtype: "Patient".into(),
            id: id.clone(),
        };
        let stale = apply(&mut store, &mut stats, put(by_id(), Some("W/\"0\"")), 0);
        assert_eq!(stale.status, 412);
        let ok = apply(&mut store, &mut stats, put(by_id(), Some("W/\"1\"")), 0);
        assert_eq!((ok.status, ok.version), (200, 2));
        let again = apply(&mut store, &mut stats, put(by_id(), Some("W/\"1\"")), 0);
        assert_eq!(again.status, 412, "version 1 is no longer current");
    }
}
