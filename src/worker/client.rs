//! Settings → HTTP client: what of the configuration shapes the client, and building it.

use crate::http::{Auth, Client};
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
    /// Why the settings cannot be used (an unreadable secret file): nothing is sent until a
    /// reload fixes it.
    pub problem: Option<String>,
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
        match Client::new(
            base,
            self.timeout,
            self.in_flight,
            self.auth.clone(),
            self.ca_file.as_deref(),
        ) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                pgrx::warning!("fhir_sync: {e}");
                None
            }
        }
    }
}
