//! Settings → HTTP client: what of the configuration shapes the client, and building it.

use crate::http::{Auth, Client, Options};
use std::sync::Arc;
use std::time::Duration;

/// Settings that shape the HTTP client; a change rebuilds it.
#[derive(Clone, PartialEq, Debug)]
pub struct ClientSettings {
    pub base: Option<String>,
    timeout: Duration,
    in_flight: usize,
    auth: Auth,
    ca_file: Option<String>,
    /// Mutual TLS: certificate chain and key, PEM.
    client_cert: Option<(Vec<u8>, Secret)>,
    per_second: f64,
    allow_http_credentials: bool,
    /// Why the settings cannot be used (an unreadable secret file): nothing is sent until a
    /// reload fixes it.
    pub problem: Option<String>,
}

/// Key material: compared to notice a change, never printed.
#[derive(Clone, PartialEq)]
struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

impl ClientSettings {
    pub fn read() -> Self {
        use crate::gucs::{self as g, AuthMode};
        let mut problem = None;
        let mut secret = |r: Result<Option<String>, String>| match r {
            Ok(v) => v.unwrap_or_default(),
            Err(e) => {
                problem = Some(e);
                String::new()
            }
        };
        let auth = match g::auth() {
            AuthMode::None => Auth::None,
            AuthMode::Bearer => Auth::Bearer(secret(g::auth_token())),
            AuthMode::Basic => Auth::Basic(crate::http::base64(
                format!(
                    "{}:{}",
                    g::auth_username().unwrap_or_default(),
                    secret(g::auth_password())
                )
                .as_bytes(),
            )),
            AuthMode::Oauth2 => Auth::OAuth2 {
                token_url: g::oauth_token_url().unwrap_or_default(),
                client_id: g::oauth_client_id().unwrap_or_default(),
                client_secret: secret(g::oauth_client_secret()),
                scope: g::oauth_scope(),
            },
            AuthMode::SmartBackend => match (g::smart_signing_key(), g::oauth_client_id()) {
                (Ok(Some(key)), Some(client_id)) => Auth::Smart {
                    token_url: g::oauth_token_url(),
                    client_id,
                    scope: g::oauth_scope(),
                    key: Arc::new(key),
                },
                (Err(e), _) => {
                    problem = Some(e);
                    Auth::None
                }
                (Ok(None), _) => {
                    problem = Some(
                        "fhir_sync.auth = 'smart_backend' needs fhir_sync.smart_key_file".into(),
                    );
                    Auth::None
                }
                (_, None) => {
                    problem = Some(
                        "fhir_sync.auth = 'smart_backend' needs fhir_sync.oauth_client_id".into(),
                    );
                    Auth::None
                }
            },
        };
        let client_cert = match g::tls_client_cert() {
            Ok(c) => c.map(|(chain, key)| (chain, Secret(key))),
            Err(e) => {
                problem.get_or_insert(e);
                None
            }
        };
        let base = g::server_url();
        if problem.is_none()
            && !g::allow_http_credentials()
            && base
                .as_deref()
                .is_some_and(|b| crate::http::credentials_in_clear(b, &auth))
        {
            problem = Some(format!(
                "fhir_sync.auth = '{}' would send credentials over plain http://; use https, or set fhir_sync.allow_http_credentials = on",
                g::auth_name()
            ));
        }
        ClientSettings {
            base,
            timeout: g::http_timeout(),
            in_flight: g::max_in_flight(),
            auth,
            ca_file: g::ca_file(),
            client_cert,
            per_second: g::max_requests_per_second(),
            allow_http_credentials: g::allow_http_credentials(),
            problem,
        }
    }

    /// The client these settings make; None when there is no server or the settings are
    /// refused (said in the log, once per reload).
    pub fn client(&self) -> Option<Arc<Client>> {
        let base = self.base.clone()?;
        if let Some(problem) = &self.problem {
            pgrx::log!("fhir_sync worker: sending nothing: {problem}");
            return None;
        }
        let rate = crate::shmem::shared()
            .and_then(|sh| fhir_sync_core::rate::Gate::new(&sh.next_request_us, self.per_second));
        match Client::new(
            base,
            Options {
                timeout: self.timeout,
                in_flight: self.in_flight,
                auth: self.auth.clone(),
                ca_file: self.ca_file.as_deref(),
                client_cert: self
                    .client_cert
                    .as_ref()
                    .map(|(c, k)| (c.as_slice(), k.0.as_slice())),
                rate,
                allow_http_credentials: self.allow_http_credentials,
            },
        ) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                pgrx::warning!("fhir_sync: {e}");
                None
            }
        }
    }
}
