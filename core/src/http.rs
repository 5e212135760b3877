//! The HTTP side: one keep-alive agent per worker, authentication, capped responses.
//!
//! Safe to use from the worker's sending threads: nothing here touches PostgreSQL.
//! The agent follows no redirects (a 3xx is an answer, not an instruction: the worker talks
//! only to the configured server) and verifies TLS against the web roots, or against
//! fhir_sync.ca_file when set.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use ureq::Agent;

/// The transport-level result of one request, as far as delivery policy cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The server answered with this status.
    Status(u16),
    /// No connection could be made (refused, no route, DNS, TLS handshake).
    ConnectFailed,
    /// Connected, but the exchange broke (timeout, reset, malformed response).
    Broken,
}

/// `W/"<version>"`: FHIR servers compare versions as weak entity tags.
pub fn weak_etag(version: &str) -> String {
    format!("W/\"{}\"", version.trim_matches('"'))
}

/// Responses are read up to this size, counted after decompression (a 1 MiB gzip body can
/// inflate to a gigabyte); a larger body is cut (its status and headers still count).
pub const MAX_BODY: u64 = 1 << 20;

/// Bounds on a token's lifetime as the token endpoint states it (`expires_in`): a hostile or
/// broken endpoint can neither make the worker fetch a token per request nor keep one forever.
const TOKEN_LIFETIME: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(86_400));

/// Reads at most `cap` decoded bytes of a body. ureq's own limit counts the bytes on the wire,
/// before the gzip or brotli decoder, so the decoded stream is capped here.
fn read_capped(body: &mut ureq::Body, cap: u64) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    let mut out = Vec::new();
    let reader = body.with_config().limit(cap).reader();
    match reader.take(cap + 1).read_to_end(&mut out) {
        Ok(_) if out.len() as u64 > cap => Err(ReadError::TooLarge),
        Ok(_) => Ok(out),
        Err(e) => match ureq::Error::from(e) {
            ureq::Error::BodyExceedsLimit(_) => Err(ReadError::TooLarge),
            e => Err(ReadError::Broken(describe(&e))),
        },
    }
}

enum ReadError {
    TooLarge,
    Broken(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Auth {
    None,
    Bearer(String),
    Basic(String),
    OAuth2 {
        token_url: String,
        client_id: String,
        client_secret: String,
        scope: Option<String>,
    },
    /// SMART Backend Services: the client-credentials grant, authenticated by a JWT assertion
    /// signed with `key`. No `token_url`: read from `[base]/.well-known/smart-configuration`.
    Smart {
        token_url: Option<String>,
        client_id: String,
        scope: Option<String>,
        key: Arc<crate::smart::SigningKey>,
    },
}

impl Auth {
    /// Whether requests carry a token fetched from a token endpoint (which a 401 may mean has
    /// been revoked).
    fn fetches_tokens(&self) -> bool {
        matches!(self, Auth::OAuth2 { .. } | Auth::Smart { .. })
    }
}

/// What shapes a client besides its base URL; the extension builds it from the settings.
pub struct Options<'a> {
    /// Bound on one request, connection included.
    pub timeout: Duration,
    pub in_flight: usize,
    pub auth: Auth,
    /// PEM file of the CA certificates to trust instead of the web roots.
    pub ca_file: Option<&'a str>,
    /// Mutual TLS: the client's certificate chain and private key, both PEM (their files are
    /// read, and the key's checked to be private, by the caller).
    pub client_cert: Option<(&'a [u8], &'a [u8])>,
    /// The request-rate cap, shared by every worker that sends to this server.
    pub rate: Option<crate::rate::Gate>,
    /// Whether a discovered token endpoint may be plain http:// (fhir_sync.allow_http_credentials).
    pub allow_http_credentials: bool,
}

/// Everything the worker needs to talk to the server; rebuilt when settings change.
pub struct Client {
    pub base: String,
    agent: Agent,
    auth: Auth,
    token: Mutex<Option<(String, Instant)>>,
    /// The token endpoint read from the SMART configuration, once per client.
    discovered: Mutex<Option<String>>,
    rate: Option<crate::rate::Gate>,
    allow_http_credentials: bool,
    /// The most entries a Bundle may have, lowered when the server refuses one as too large.
    bundle_limit: std::sync::atomic::AtomicUsize,
    /// The CapabilityStatement once read, and when it was last tried.
    #[allow(clippy::type_complexity)]
    capabilities: Mutex<(
        Option<Arc<crate::capability::Capabilities>>,
        Option<Instant>,
    )>,
    resolved: Resolved,
}

#[derive(Clone, Debug)]
pub struct Response {
    pub transport: Transport,
    pub body: Vec<u8>,
    pub etag: Option<String>,
    pub location: Option<String>,
    pub retry_after: Option<String>,
    pub elapsed: Duration,
    /// Transport error text, for the log and last_error (never contains payload).
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Put,
    Delete,
    Get,
    Post,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Get => "GET",
            Method::Post => "POST",
        }
    }
}

/// A CapabilityStatement is read up to this size (an EHR's lists hundreds of types).
const MAX_CAPABILITIES: u64 = 16 << 20;

/// How often an unreadable CapabilityStatement is asked for again.
const CAPABILITIES_RETRY: Duration = Duration::from_secs(60);

/// How long a host name's addresses are reused before it is looked up again.
const RESOLVED_TTL: Duration = Duration::from_secs(10);

/// ureq looks the server's name up before every request, pooled connection or not, and with a
/// timeout set it does so on a thread of its own: a thread start per request (a third of a
/// sending thread's time in a pgbench run). The addresses are kept a few seconds instead; a
/// failed connection forgets them, so a server that moved is looked up again at once.
#[derive(Debug, Default)]
struct CachedResolver<R = ureq::unversioned::resolver::DefaultResolver> {
    inner: R,
    known: Resolved,
}

/// The addresses known per host (`host:port`), shared by the resolver and the client.
#[derive(Clone, Debug, Default)]
struct Resolved(
    Arc<Mutex<HashMap<String, (Instant, ureq::unversioned::resolver::ResolvedSocketAddrs)>>>,
);

impl Resolved {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        HashMap<String, (Instant, ureq::unversioned::resolver::ResolvedSocketAddrs)>,
    > {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection failed: the next request looks every host up again.
    fn forget(&self) {
        self.lock().clear();
    }
}

impl<R: ureq::unversioned::resolver::Resolver> ureq::unversioned::resolver::Resolver
    for CachedResolver<R>
{
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let key = uri
            .authority()
            .map(|a| a.as_str())
            .unwrap_or_default()
            .to_string();
        let mut known = self.known.lock();
        if let Some((at, addrs)) = known.get(&key) {
            if at.elapsed() < RESOLVED_TTL {
                return Ok(addrs.clone());
            }
        }
        // Not under the lock: a slow lookup must not hold up requests to known hosts.
        drop(known);
        let addrs = self.inner.resolve(uri, config, timeout)?;
        known = self.known.lock();
        known.insert(key, (Instant::now(), addrs.clone()));
        Ok(addrs)
    }
}

impl Client {
    pub fn new(base: String, o: Options) -> Result<Client, String> {
        let Options {
            timeout,
            in_flight,
            auth,
            ca_file,
            client_cert,
            rate,
            allow_http_credentials,
        } = o;
        let mut config = Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("fhir_sync/", env!("CARGO_PKG_VERSION")))
            .max_idle_connections_per_host(in_flight.max(1) * 2)
            .max_idle_connections(in_flight.max(1) * 4)
            .accept("application/fhir+json, application/json;q=0.9");
        if ca_file.is_some() || client_cert.is_some() {
            let mut tls = ureq::tls::TlsConfig::builder();
            if let Some(path) = ca_file {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("cannot read fhir_sync.ca_file \"{path}\": {e}"))?;
                let certs = certificates(&pem);
                if certs.is_empty() {
                    return Err(format!(
                        "fhir_sync.ca_file \"{path}\" holds no PEM certificate"
                    ));
                }
                tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
            }
            if let Some((chain, key)) = client_cert {
                let certs = certificates(chain);
                if certs.is_empty() {
                    return Err("fhir_sync.tls_client_cert_file holds no PEM certificate".into());
                }
                let key = ureq::tls::PrivateKey::from_pem(key).map_err(|_| {
                    "fhir_sync.tls_client_key_file holds no unencrypted PEM private key".to_string()
                })?;
                tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&certs, key)));
            }
            config = config.tls_config(tls.build());
        }
        let resolver: CachedResolver = CachedResolver::default();
        Ok(Client {
            base,
            resolved: resolver.known.clone(),
            agent: Agent::with_parts(
                config.build(),
                ureq::unversioned::transport::DefaultConnector::default(),
                resolver,
            ),
            auth,
            token: Mutex::new(None),
            discovered: Mutex::new(None),
            rate,
            allow_http_credentials,
            bundle_limit: std::sync::atomic::AtomicUsize::new(usize::MAX),
            capabilities: Mutex::new((None, None)),
        })
    }

    /// Forgets what was learnt about the server (its CapabilityStatement, the Bundle size it
    /// refused): a reload reads it again.
    pub fn relearn(&self) {
        *self.capabilities.lock().unwrap_or_else(|p| p.into_inner()) = (None, None);
        self.bundle_limit
            .store(usize::MAX, std::sync::atomic::Ordering::Relaxed);
    }

    /// The most entries a Bundle to this server may have (what it has refused, halved).
    pub fn bundle_limit(&self) -> usize {
        self.bundle_limit.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The server refused a Bundle as too large: send at most `n` entries (at least one) from
    /// now on.
    pub fn lower_bundle_limit(&self, n: usize) {
        self.bundle_limit
            .fetch_min(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// One request. `path` is relative to the base URL ("Patient?identifier=…", "metadata").
    /// `if_match` makes an update conditional on the version the server holds (`W/"3"`).
    ///
    /// A 401 to a request that carried a cached token fetches a new token and sends the request
    /// once more at once: the token may have been revoked. A second 401 is the answer.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        if_match: Option<&str>,
    ) -> Response {
        self.request_with(method, path, body, if_match, None)
    }

    /// [`Client::request`] with an `If-None-Exist` search (a conditional create, `POST [base]/Type`).
    pub fn request_with(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        if_match: Option<&str>,
        if_none_exist: Option<&str>,
    ) -> Response {
        let started = Instant::now();
        let url = if path.is_empty() {
            self.base.clone()
        } else {
            format!("{}/{}", self.base, path)
        };
        let mut refreshed = false;
        loop {
            let (auth, fresh) = match self.authorization() {
                Ok(a) => a,
                Err(NoToken::Unreachable(e)) => {
                    return failed(Transport::ConnectFailed, e, started)
                }
                // A token endpoint that refuses (a key it does not know, a wrong client id, a
                // clock it finds skewed) is a credentials problem: the auth pause, not an outage.
                Err(NoToken::Refused(e)) => return failed(Transport::Status(401), e, started),
            };
            if let Some(gate) = &self.rate {
                gate.wait();
            }
            let resp = self.exchange(
                method,
                &url,
                body,
                (if_match, if_none_exist),
                auth.as_deref(),
                (started, MAX_BODY),
            );
            if resp.transport == Transport::Status(401) && self.auth.fetches_tokens() {
                *self.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
                if !fresh && !refreshed {
                    refreshed = true;
                    continue;
                }
            }
            return resp;
        }
    }

    fn exchange(
        &self,
        method: Method,
        url: &str,
        body: Option<&[u8]>,
        (if_match, if_none_exist): (Option<&str>, Option<&str>),
        auth: Option<&str>,
        (started, cap): (Instant, u64),
    ) -> Response {
        let result = match method {
            Method::Put | Method::Post => {
                let b = if method == Method::Put {
                    self.agent.put(url)
                } else {
                    self.agent.post(url)
                };
                let b = b.header("Content-Type", "application/fhir+json");
                let b = match if_match {
                    Some(v) => b.header("If-Match", v),
                    None => b,
                };
                let b = match if_none_exist {
                    Some(v) => b.header("If-None-Exist", v),
                    None => b,
                };
                let b = match auth {
                    Some(h) => b.header("Authorization", h),
                    None => b,
                };
                b.send(body.unwrap_or_default())
            }
            Method::Delete | Method::Get => {
                let b = if method == Method::Get {
                    self.agent.get(url)
                } else {
                    self.agent.delete(url)
                };
                let b = match auth {
                    Some(h) => b.header("Authorization", h),
                    None => b,
                };
                b.call()
            }
        };
        match result {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let header = |n: &str| {
                    resp.headers()
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                let (etag, location, retry_after) =
                    (header("etag"), header("location"), header("retry-after"));
                let (body, error, transport) = match read_capped(resp.body_mut(), cap) {
                    Ok(b) => (b, None, Transport::Status(status)),
                    Err(ReadError::TooLarge) => (
                        Vec::new(),
                        Some("response body larger than 1 MiB (decoded) was cut".into()),
                        Transport::Status(status),
                    ),
                    // The status arrived but the body broke off: the server's answer is unknown.
                    Err(ReadError::Broken(e)) => (Vec::new(), Some(e), Transport::Broken),
                };
                Response {
                    transport,
                    body,
                    etag,
                    location,
                    retry_after,
                    elapsed: started.elapsed(),
                    error,
                }
            }
            Err(e) => {
                let t = if is_connect_failure(&e) {
                    self.resolved.forget();
                    Transport::ConnectFailed
                } else {
                    Transport::Broken
                };
                failed(t, describe(&e), started)
            }
        }
    }

    /// The server's CapabilityStatement, read on first use (and again at most every
    /// CAPABILITIES_RETRY while it cannot be read); None while unknown.
    pub fn capabilities(&self) -> Option<Arc<crate::capability::Capabilities>> {
        let mut known = self.capabilities.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(c), _) = &*known {
            return Some(c.clone());
        }
        if known.1.is_some_and(|t| t.elapsed() < CAPABILITIES_RETRY) {
            return None;
        }
        known.1 = Some(Instant::now());
        let (auth, _) = self.authorization().ok()?;
        let resp = self.exchange(
            Method::Get,
            // `mode=full` (R4's capabilities interaction): the whole statement, and a request the
            // test servers can tell from the reachability probe.
            &format!("{}/metadata?mode=full", self.base),
            None,
            (None, None),
            auth.as_deref(),
            (Instant::now(), MAX_CAPABILITIES),
        );
        if resp.transport != Transport::Status(200) {
            return None;
        }
        let caps = Arc::new(crate::capability::parse(&resp.body).ok()?);
        known.0 = Some(caps.clone());
        Some(caps)
    }

    /// Whether the server answers HTTP at all (any status). Reads no body: a CapabilityStatement
    /// can be megabytes.
    pub fn reachable(&self) -> bool {
        match self.agent.get(format!("{}/metadata", self.base)).call() {
            Ok(_) => true,
            Err(e) => !is_connect_failure(&e),
        }
    }

    /// The Authorization header, and whether its token was fetched just now.
    fn authorization(&self) -> Result<(Option<String>, bool), NoToken> {
        match &self.auth {
            Auth::None => Ok((None, false)),
            Auth::Bearer(t) => Ok((Some(format!("Bearer {t}")), false)),
            Auth::Basic(b) => Ok((Some(format!("Basic {b}")), false)),
            Auth::OAuth2 { .. } | Auth::Smart { .. } => {
                let mut cached = self.token.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((t, until)) = cached.as_ref() {
                    if Instant::now() < *until {
                        return Ok((Some(format!("Bearer {t}")), false));
                    }
                }
                let (token, lifetime) = self.fetch_token()?;
                // Refresh before expiry so no request goes out with a token about to lapse.
                let margin = (lifetime / 10).clamp(Duration::from_secs(5), Duration::from_secs(60));
                *cached = Some((
                    token.clone(),
                    Instant::now() + lifetime.saturating_sub(margin),
                ));
                Ok((Some(format!("Bearer {token}")), true))
            }
        }
    }

    fn fetch_token(&self) -> Result<(String, Duration), NoToken> {
        match &self.auth {
            Auth::OAuth2 {
                token_url,
                client_id,
                client_secret,
                scope,
            } => {
                let mut form = vec![("grant_type", "client_credentials")];
                if let Some(s) = scope {
                    form.push(("scope", s));
                }
                let basic = base64(
                    format!("{}:{}", url_encode(client_id), url_encode(client_secret)).as_bytes(),
                );
                token_request(&self.agent, token_url, form, Some(&basic))
                    .map_err(|e| e.context("fhir_sync.oauth_token_url"))
            }
            Auth::Smart {
                token_url,
                client_id,
                scope,
                key,
            } => {
                let url = match token_url {
                    Some(u) => u.clone(),
                    None => self.smart_token_endpoint()?,
                };
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let assertion = key.assertion(client_id, &url, now, &crate::smart::new_jti())?;
                let mut form = vec![
                    ("grant_type", "client_credentials"),
                    ("client_assertion_type", crate::smart::ASSERTION_TYPE),
                    ("client_assertion", assertion.as_str()),
                ];
                if let Some(s) = scope {
                    form.push(("scope", s));
                }
                token_request(&self.agent, &url, form, None)
                    .map_err(|e| e.context("SMART token endpoint"))
            }
            _ => Err(NoToken::Refused(
                "this authentication fetches no token".into(),
            )),
        }
    }

    /// `token_endpoint` of `[base]/.well-known/smart-configuration`, read once per client.
    fn smart_token_endpoint(&self) -> Result<String, NoToken> {
        let mut known = self.discovered.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = known.as_ref() {
            return Ok(u.clone());
        }
        let url = format!("{}/.well-known/smart-configuration", self.base);
        let mut resp = self
            .agent
            .get(&url)
            .header("Accept", "application/json")
            .call()
            .map_err(|e| {
                NoToken::Unreachable(format!(
                    "reading the SMART configuration failed: {}",
                    describe(&e)
                ))
            })?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(NoToken::Refused(format!(
                "reading the SMART configuration ({url}) answered HTTP {status}; set fhir_sync.oauth_token_url"
            )));
        }
        let body = read_capped(resp.body_mut(), 256 * 1024).unwrap_or_default();
        let endpoint = crate::smart::token_endpoint(&body)?;
        if !self.allow_http_credentials && endpoint.to_ascii_lowercase().starts_with("http://") {
            return Err(NoToken::Refused(
                "the SMART configuration names a plain http:// token endpoint; the assertion is not sent there (fhir_sync.allow_http_credentials)"
                    .into(),
            ));
        }
        *known = Some(endpoint.clone());
        Ok(endpoint)
    }
}

fn certificates(pem: &[u8]) -> Vec<ureq::tls::Certificate<'static>> {
    ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect()
}

fn failed(transport: Transport, error: String, started: Instant) -> Response {
    Response {
        transport,
        body: Vec::new(),
        etag: None,
        location: None,
        retry_after: None,
        elapsed: started.elapsed(),
        error: Some(error),
    }
}

fn is_connect_failure(e: &ureq::Error) -> bool {
    match e {
        // A certificate the worker does not trust is a configuration problem, like a wrong
        // host: pause and say so, rather than spend the changes' attempts.
        ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed
        | ureq::Error::Tls(_)
        | ureq::Error::Rustls(_) => true,
        ureq::Error::Timeout(t) => matches!(t, ureq::Timeout::Connect | ureq::Timeout::Resolve),
        ureq::Error::Io(io) => {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::AddrNotAvailable
                    | std::io::ErrorKind::NotConnected
            ) || (io.kind() == std::io::ErrorKind::InvalidData
                // rustls reports a failed verification through the I/O error it returns.
                && io.to_string().contains("certificate"))
        }
        _ => false,
    }
}

fn describe(e: &ureq::Error) -> String {
    // ureq's messages name the URL at most, never a body.
    let s = e.to_string();
    s.chars().take(300).collect()
}

/// A client-credentials token request (RFC 6749 §4.4): with HTTP Basic client authentication
/// (OAuth2) or a client assertion in the form (SMART Backend Services). The errors name the
/// status, never the endpoint's body (it may echo the request).
/// Why no token could be had.
#[derive(Debug)]
enum NoToken {
    /// The endpoint could not be reached: like any unreachable server.
    Unreachable(String),
    /// It answered, and gave no token.
    Refused(String),
}

impl NoToken {
    fn context(self, what: &str) -> NoToken {
        match self {
            NoToken::Unreachable(e) => NoToken::Unreachable(format!("{what}: {e}")),
            NoToken::Refused(e) => NoToken::Refused(format!("{what}: {e}")),
        }
    }
}

impl From<String> for NoToken {
    fn from(e: String) -> NoToken {
        NoToken::Refused(e)
    }
}

impl From<&str> for NoToken {
    fn from(e: &str) -> NoToken {
        NoToken::Refused(e.to_string())
    }
}

fn token_request(
    agent: &Agent,
    url: &str,
    form: Vec<(&str, &str)>,
    basic: Option<&str>,
) -> Result<(String, Duration), NoToken> {
    let b = agent.post(url).header("Accept", "application/json");
    let b = match basic {
        Some(basic) => b.header("Authorization", &format!("Basic {basic}")),
        None => b,
    };
    let mut resp = b
        .send_form(form)
        .map_err(|e| NoToken::Unreachable(format!("token request failed: {}", describe(&e))))?;
    let status = resp.status().as_u16();
    let body = read_capped(resp.body_mut(), 64 * 1024).unwrap_or_default();
    if !(200..300).contains(&status) {
        return Err(format!("token endpoint answered HTTP {status}").into());
    }
    let json: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|_| NoToken::from("token endpoint answered with no JSON"))?;
    let token = json
        .get("access_token")
        .and_then(|t| t.as_str())
        .ok_or("token endpoint answered with no access_token")?;
    let lifetime = json
        .get("expires_in")
        .and_then(|e| e.as_u64())
        .unwrap_or(300);
    Ok((token.to_string(), token_lifetime(lifetime)))
}

fn token_lifetime(expires_in: u64) -> Duration {
    Duration::from_secs(expires_in).clamp(TOKEN_LIFETIME.0, TOKEN_LIFETIME.1)
}

/// Whether `auth` would send a credential over plain http (to `base` or its token endpoint).
pub fn credentials_in_clear(base: &str, auth: &Auth) -> bool {
    let plain = |u: &str| u.trim().to_ascii_lowercase().starts_with("http://");
    match auth {
        Auth::None => false,
        Auth::OAuth2 { token_url, .. } => plain(base) || plain(token_url),
        Auth::Smart { token_url, .. } => plain(base) || token_url.as_deref().is_some_and(plain),
        _ => plain(base),
    }
}

/// FHIR's `id` type: 1 to 64 of `A-Z a-z 0-9 - .`; `.` and `..` are refused as path segments.
/// What the server calls a resource (its id, its version) goes into our URLs and headers only if
/// it is one.
pub fn is_fhir_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && s != "."
        && s != ".."
}

/// Percent-encodes everything but RFC 3986 unreserved characters: safe in a query value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `system|value` as a conditional-update search: `identifier=<system>%7C<value>`.
///
/// Inside a token search value a comma means OR and a backslash escapes (FHIR search, §3.2.1.5.7),
/// so both are escaped first: an unescaped comma would make the PUT match nothing and create a
/// duplicate on every send.
pub fn identifier_query(system: &str, value: &str) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace(',', "\\,");
    format!(
        "identifier={}%7C{}",
        url_encode(&esc(system)),
        url_encode(&esc(value))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
    use ureq::unversioned::transport::{time, NextTimeout};

    /// Answers every lookup with 127.0.0.1 and counts them.
    #[derive(Debug, Default)]
    struct Counting(Arc<AtomicUsize>);

    impl Resolver for Counting {
        fn resolve(
            &self,
            _: &ureq::http::Uri,
            _: &ureq::config::Config,
            _: NextTimeout,
        ) -> Result<ResolvedSocketAddrs, ureq::Error> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let mut a = self.empty();
            a.push("127.0.0.1:8080".parse().unwrap());
            Ok(a)
        }
    }

    #[test]
    fn a_host_is_looked_up_once_until_a_connection_fails() {
        let lookups = Arc::new(AtomicUsize::new(0));
        let r = CachedResolver {
            inner: Counting(lookups.clone()),
            known: Resolved::default(),
        };
        let config = ureq::config::Config::default();
        let timeout = NextTimeout {
            after: time::Duration::NotHappening,
            reason: ureq::Timeout::Resolve,
            per_read: None,
            per_write: None,
        };
        let fhir: ureq::http::Uri = "http://fhir.example:8080/fhir/Patient".parse().unwrap();
        let other: ureq::http::Uri = "http://auth.example/token".parse().unwrap();
        for _ in 0..100 {
            r.resolve(&fhir, &config, timeout).unwrap();
        }
        assert_eq!(
            lookups.load(Ordering::SeqCst),
            1,
            "one lookup for a hundred requests"
        );
        r.resolve(&other, &config, timeout).unwrap();
        assert_eq!(
            lookups.load(Ordering::SeqCst),
            2,
            "each host is looked up on its own"
        );
        // What Client::request does when a connection fails: the next request looks up again.
        r.known.forget();
        r.resolve(&fhir, &config, timeout).unwrap();
        assert_eq!(lookups.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_token_lifetime_from_the_endpoint_is_bounded() {
        assert_eq!(token_lifetime(0), Duration::from_secs(10));
        assert_eq!(token_lifetime(3600), Duration::from_secs(3600));
        assert_eq!(token_lifetime(u64::MAX), Duration::from_secs(86_400));
    }

    #[test]
    fn credentials_over_plain_http_are_recognised() {
        let bearer = Auth::Bearer("t".into());
        assert!(credentials_in_clear("http://fhir.example/fhir", &bearer));
        assert!(credentials_in_clear("HTTP://fhir.example/fhir", &bearer));
        assert!(!credentials_in_clear("https://fhir.example/fhir", &bearer));
        assert!(!credentials_in_clear(
            "http://fhir.example/fhir",
            &Auth::None
        ));
        let oauth = |url: &str| Auth::OAuth2 {
            token_url: url.into(),
            client_id: "c".into(),
            client_secret: "s".into(),
            scope: None,
        };
        assert!(credentials_in_clear(
            "https://fhir.example",
            &oauth("http://auth.example/token")
        ));
        assert!(!credentials_in_clear(
            "https://fhir.example",
            &oauth("https://auth.example/token")
        ));
    }

    #[test]
    fn identifiers_are_encoded_for_a_query_string() {
        assert_eq!(
            identifier_query("http://hospital.example.org/mrn", "MRN 1&2"),
            "identifier=http%3A%2F%2Fhospital.example.org%2Fmrn%7CMRN%201%262"
        );
        assert_eq!(
            identifier_query("urn:fhir-sync/public.form", "7"),
            "identifier=urn%3Afhir-sync%2Fpublic.form%7C7"
        );
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }
}
