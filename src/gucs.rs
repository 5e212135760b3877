//! Every `fhir_sync.*` setting: one documented static each, one `init()`, one accessor each.
//!
//! Worker settings are `Sighup`: `SELECT pg_reload_conf()` applies them, no restart needed.
//! Secrets are `SUPERUSER_ONLY | NO_SHOW_ALL`, so `SHOW`, `pg_settings` and `SHOW ALL`
//! hide them from ordinary roles. Each secret also has a `*_file` setting naming a file that
//! holds it: PostgreSQL logs a setting's new value when a reload changes it, so a secret set
//! with ALTER SYSTEM reaches the log; a file's content never does.

use fhir_sync_core::send::{BundleType, WriteMode};
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use std::ffi::CString;

/// FHIR base URL the workers send to, e.g. `http://fhir.example.org/fhir`. Empty: the workers
/// capture nothing less but send nothing until it is set.
pub static SERVER_URL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// The role the delivery workers connect as. Empty: the bootstrap superuser (the launcher warns).
/// A dedicated role needs only what `fhir_sync_grant_worker(role)` grants.
pub static USERNAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Bound on any lock wait of the worker's statements and of owners' code they run (ms). A lock an
/// ordinary role holds on a tracked table then holds back that table's changes only.
pub static LOCK_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(1_000);

/// Bound on the worker's statements, and on each call of owners' code (a cast or mapping
/// function that sleeps) (ms). A row whose reading exceeds it is dead-lettered on its own.
pub static STATEMENT_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// Whether credentials may be sent over plain http:// (to a server or token endpoint). Off: a
/// configured secret with an http:// URL sends nothing, and says why.
pub static ALLOW_HTTP_CREDENTIALS: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Comma-separated databases served by the workers.
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));

/// Workers per database. 0 disables delivery (capture still fills the outbox).
pub static WORKERS: GucSetting<i32> = GucSetting::<i32>::new(1);

/// How many resources one worker claims at a time.
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(200);

/// Failed attempts (transient errors) before a change is dead-lettered.
pub static MAX_RETRIES: GucSetting<i32> = GucSetting::<i32>::new(5);

/// Bound on one HTTP request, connection included (milliseconds).
pub static HTTP_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// Fallback poll (milliseconds). Commits wake the workers at once; the poll only catches what
/// no commit announced (COMMIT PREPARED, retries coming due).
pub static POLL_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(1_000);

/// Under load, how long changes gather after a cycle began before the next claim (milliseconds).
/// A cycle has a fixed cost (three short transactions, a claim, the sending threads woken):
/// under a steady stream of commits a worker that claims at every commit spends it for a few rows
/// each time, and takes the CPU the writers need. Only a cycle that found more than one resource
/// makes the next one wait; a lone change is never held back.
pub static LINGER: GucSetting<i32> = GucSetting::<i32>::new(10);

/// How long a claim stays owned by its worker before another may take it over (milliseconds).
pub static LEASE_TIME: GucSetting<i32> = GucSetting::<i32>::new(120_000);

/// Requests one worker keeps in flight at once (never two for one resource).
pub static MAX_IN_FLIGHT: GucSetting<i32> = GucSetting::<i32>::new(4);

/// Entries per Bundle; 0 or 1 sends one request per resource.
pub static BUNDLE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(0);

/// Bundle type (the enum is `send::BundleType`, shared with the sending code).
pub static BUNDLE_TYPE: GucSetting<BundleType> = GucSetting::<BundleType>::new(BundleType::Batch);

/// Base URI for identifiers derived from table and primary key.
pub static IDENTIFIER_SYSTEM: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"urn:fhir-sync"));

/// How long an Encounter or Observation may wait for its Patient before it is dead-lettered (s).
pub static DEPENDENCY_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(3_600);

/// Copy the changed row into fhir_outbox.payload_json. Off by default: the worker reads rows as
/// they stand at send time, and a second copy of patient data is a liability.
pub static CAPTURE_PAYLOAD: GucSetting<bool> = GucSetting::<bool>::new(false);

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum AuthMode {
    #[name = c"none"]
    None,
    #[name = c"bearer"]
    Bearer,
    #[name = c"basic"]
    Basic,
    #[name = c"oauth2"]
    Oauth2,
    #[name = c"smart_backend"]
    SmartBackend,
}

/// How the workers authenticate to the FHIR server.
pub static AUTH: GucSetting<AuthMode> = GucSetting::<AuthMode>::new(AuthMode::None);
/// Bearer token (auth = bearer). Secret.
pub static AUTH_TOKEN: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// User name (auth = basic).
pub static AUTH_USERNAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Password (auth = basic). Secret.
pub static AUTH_PASSWORD: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// OAuth2 token endpoint (auth = oauth2, client-credentials grant).
pub static OAUTH_TOKEN_URL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// OAuth2 client id.
pub static OAUTH_CLIENT_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// OAuth2 client secret. Secret.
pub static OAUTH_CLIENT_SECRET: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
/// Files holding the secrets above (first line; owned by the server's OS user, mode 0600 or
/// 0400). Read when a worker starts and at every reload; a set file wins over the setting.
pub static AUTH_TOKEN_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static AUTH_PASSWORD_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static OAUTH_CLIENT_SECRET_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
/// OAuth2 scope, optional.
pub static OAUTH_SCOPE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// PEM file of CA certificates trusted for https (replaces the built-in web roots).
pub static CA_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// SMART Backend Services (auth = smart_backend): the PEM private key assertions are signed
/// with (RSA → RS384, EC P-384 → ES384), private to the PostgreSQL OS user.
pub static SMART_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// The `kid` of that key as registered with the EHR; empty: its RFC 7638 thumbprint.
pub static SMART_KEY_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// A key being rotated out: published by `fhir_sync_jwks()` beside the signing key, never used
/// to sign. Lets the EHR's cached JWKS hold both while it catches up.
pub static SMART_PREVIOUS_KEY_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static SMART_PREVIOUS_KEY_ID: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
/// Mutual TLS: the client certificate chain (PEM) presented to the server.
pub static TLS_CLIENT_CERT_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
/// Its private key (PEM, unencrypted), private to the PostgreSQL OS user.
pub static TLS_CLIENT_KEY_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
/// How resources are first written, for tables tracked without a `write_mode` (the enum is
/// `send::WriteMode`, shared with the sending code).
pub static WRITE_MODE: GucSetting<WriteMode> = GucSetting::<WriteMode>::new(WriteMode::Upsert);
/// Requests per second to the FHIR server, all workers together; 0: no cap.
pub static MAX_REQUESTS_PER_SECOND: GucSetting<f64> = GucSetting::<f64>::new(0.0);

pub fn init() {
    let secret = GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL;
    let ms = GucFlags::UNIT_MS;
    let s = GucFlags::UNIT_S;
    use GucContext::Sighup;

    GucRegistry::define_string_guc(
        c"fhir_sync.server_url",
        c"FHIR server base URL.",
        c"Conditional PUT and DELETE go to <server_url>/<Type>?identifier=system|value.",
        &SERVER_URL,
        Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"fhir_sync.database",
        c"Comma-separated databases whose outbox the workers deliver.",
        c"The launcher starts fhir_sync.workers workers for each listed database that exists; a reload starts or stops them.",
        &DATABASE,
        Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"fhir_sync.username",
        c"Role the delivery workers connect as.",
        c"Empty: the bootstrap superuser. Name a non-superuser LOGIN role given its rights with SELECT fhir_sync_grant_worker('role'); a change restarts the workers.",
        &USERNAME,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"fhir_sync.lock_timeout",
        c"Bound on any lock wait of the worker.",
        c"A tracked table locked longer than this holds back its own changes only; they are retried.",
        &LOCK_TIMEOUT,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"fhir_sync.statement_timeout",
        c"Bound on the worker's statements and on each call of code owned by a tracked table's owner.",
        c"A row whose reading or mapping takes longer is dead-lettered on its own. 0: no bound.",
        &STATEMENT_TIMEOUT,
        0,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"fhir_sync.allow_http_credentials",
        c"Allow credentials over plain http:// URLs.",
        c"Off: with an http:// server_url or oauth_token_url and an auth mode other than none, nothing is sent.",
        &ALLOW_HTTP_CREDENTIALS,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"fhir_sync.workers",
        c"Background workers per database.",
        c"0 disables delivery.",
        &WORKERS,
        0,
        crate::shmem::MAX_WORKERS as i32,
        Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"fhir_sync.batch_size",
        c"Resources a worker claims at a time.",
        c"At least bundle_size times max_in_flight. All pending changes of a claimed resource go out as one request.",
        &BATCH_SIZE,
        1,
        100_000,
        Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"fhir_sync.max_retries",
        c"Attempts before a change is dead-lettered.",
        c"Only transient failures spend attempts; an unreachable server does not.",
        &MAX_RETRIES,
        1,
        1000,
        Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"fhir_sync.http_timeout",
        c"Bound on one HTTP request.",
        c"Connection, request and response together. A request that times out is retried with backoff.",
        &HTTP_TIMEOUT,
        100,
        600_000,
        Sighup,
        ms,
    );
    GucRegistry::define_int_guc(
        c"fhir_sync.poll_interval",
        c"Fallback poll of the outbox when no commit wakes the worker.",
        c"Commits wake the workers at once; the poll finds retries coming due and changes no commit announced (COMMIT PREPARED).",
        &POLL_INTERVAL,
        10,
        3_600_000,
        Sighup,
        ms,
    );
    GucRegistry::define_int_guc(
        c"fhir_sync.linger",
        c"Under load, the longest changes gather after a worker cycle began before the next claim.",
        c"Only a cycle that found more than one resource makes the next one wait, for one cycle's fixed cost (learnt from recent cycles) and at most this long after it began; 0 claims at every commit.",
        &LINGER,
        0,
        1_000,
        Sighup,
        ms,
    );
    GucRegistry::define_int_guc(
        c"fhir_sync.lease_time",
        c"How long a worker owns the changes it claimed.",
        c"After this a claim is considered abandoned and another worker takes it over.",
        &LEASE_TIME,
        1_000,
        86_400_000,
        Sighup,
        ms,
    );
    GucRegistry::define_int_guc(
        c"fhir_sync.max_in_flight",
        c"Concurrent requests per worker.",
        c"Never more than one for the same resource.",
        &MAX_IN_FLIGHT,
        1,
        64,
        Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"fhir_sync.bundle_size",
        c"Entries per Bundle; 0 sends one request per resource.",
        c"Bundles are POSTed to the base URL; each entry is a conditional PUT or a DELETE.",
        &BUNDLE_SIZE,
        0,
        10_000,
        Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"fhir_sync.bundle_type",
        c"Bundle type: batch or transaction.",
        c"batch: each entry settles on its own. transaction: all or nothing; a failed transaction is re-sent entry by entry.",
        &BUNDLE_TYPE,
        Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"fhir_sync.identifier_system",
        c"Base URI of identifiers derived from table and primary key.",
        c"A row of public.form with id 7 gets identifier <base>/public.form|7.",
        &IDENTIFIER_SYSTEM,
        Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"fhir_sync.dependency_timeout",
        c"How long a resource waits for the Patient or Encounter it references.",
        c"After this an Encounter or Observation whose Patient never reached the server is dead-lettered (class dependency).",
        &DEPENDENCY_TIMEOUT,
        1,
        30 * 86_400,
        Sighup,
        s,
    );
    GucRegistry::define_bool_guc(
        c"fhir_sync.capture_payload",
        c"Copy each changed row into fhir_outbox.payload_json.",
        c"Off by default: the worker reads rows as they stand at send time, and a second copy of patient data is a liability.",
        &CAPTURE_PAYLOAD,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"fhir_sync.auth",
        c"Authentication to the FHIR server: none, bearer, basic, oauth2 or smart_backend.",
        c"bearer: auth_token(_file); basic: auth_username and auth_password(_file); oauth2: the client-credentials grant (oauth_*); smart_backend: SMART Backend Services, a JWT assertion signed with smart_key_file (oauth_client_id, oauth_scope, oauth_token_url or the server's .well-known/smart-configuration).",
        &AUTH,
        Sighup,
        GucFlags::default(),
    );
    for (name, short, long, setting, flags) in [
        (
            c"fhir_sync.auth_token",
            c"Bearer token (secret).",
            c"Secret. Prefer auth_token_file: PostgreSQL logs a reloaded setting's new value.",
            &AUTH_TOKEN,
            secret,
        ),
        (
            c"fhir_sync.auth_username",
            c"Basic auth user name.",
            c"Sent with auth_password as HTTP Basic when fhir_sync.auth = basic.",
            &AUTH_USERNAME,
            GucFlags::default(),
        ),
        (
            c"fhir_sync.auth_password",
            c"Basic auth password (secret).",
            c"Secret. Prefer auth_password_file: PostgreSQL logs a reloaded setting's new value.",
            &AUTH_PASSWORD,
            secret,
        ),
        (
            c"fhir_sync.oauth_token_url",
            c"OAuth2 token endpoint.",
            c"The client-credentials grant is POSTed here; https unless allow_http_credentials is on.",
            &OAUTH_TOKEN_URL,
            GucFlags::default(),
        ),
        (
            c"fhir_sync.oauth_client_id",
            c"OAuth2 client id.",
            c"Sent with the client secret as HTTP Basic to the token endpoint.",
            &OAUTH_CLIENT_ID,
            GucFlags::default(),
        ),
        (
            c"fhir_sync.oauth_client_secret",
            c"OAuth2 client secret (secret).",
            c"Secret. Prefer oauth_client_secret_file: PostgreSQL logs a reloaded setting's new value.",
            &OAUTH_CLIENT_SECRET,
            secret,
        ),
        (
            c"fhir_sync.auth_token_file",
            c"File holding the bearer token (preferred to auth_token, which a reload logs).",
            c"The first line of a file private to the PostgreSQL OS user (mode 0600); read at start and at every reload.",
            &AUTH_TOKEN_FILE,
            GucFlags::SUPERUSER_ONLY,
        ),
        (
            c"fhir_sync.auth_password_file",
            c"File holding the basic auth password (preferred to auth_password).",
            c"The first line of a file private to the PostgreSQL OS user (mode 0600); read at start and at every reload.",
            &AUTH_PASSWORD_FILE,
            GucFlags::SUPERUSER_ONLY,
        ),
        (
            c"fhir_sync.oauth_client_secret_file",
            c"File holding the OAuth2 client secret (preferred to oauth_client_secret).",
            c"The first line of a file private to the PostgreSQL OS user (mode 0600); read at start and at every reload.",
            &OAUTH_CLIENT_SECRET_FILE,
            GucFlags::SUPERUSER_ONLY,
        ),
        (
            c"fhir_sync.oauth_scope",
            c"OAuth2 scope.",
            c"Sent as the scope of the client-credentials grant, e.g. system/*.write.",
            &OAUTH_SCOPE,
            GucFlags::default(),
        ),
        (
            c"fhir_sync.ca_file",
            c"PEM file of trusted CA certificates.",
            c"Instead of the built-in web roots. A certificate the worker does not trust pauses delivery (server unreachable).",
            &CA_FILE,
            GucFlags::default(),
        ),
        (
            c"fhir_sync.smart_key_file",
            c"PEM private key that signs SMART Backend Services assertions (auth = smart_backend).",
            c"RSA (2048 bits or more) signs RS384, EC P-384 (PKCS#8) signs ES384. Private to the PostgreSQL OS user (mode 0600); read at start and at every reload. fhir_sync_jwks() prints its public key.",
            &SMART_KEY_FILE,
            GucFlags::SUPERUSER_ONLY,
        ),
        (
            c"fhir_sync.smart_key_id",
            c"The kid of smart_key_file as registered with the EHR.",
            c"Empty: the key's RFC 7638 thumbprint.",
            &SMART_KEY_ID,
            GucFlags::default(),
        ),
        (
            c"fhir_sync.smart_previous_key_file",
            c"A SMART key being rotated out: published by fhir_sync_jwks(), never used to sign.",
            c"Set it to the old key when smart_key_file gets a new one; clear it once the EHR has the new JWKS.",
            &SMART_PREVIOUS_KEY_FILE,
            GucFlags::SUPERUSER_ONLY,
        ),
        (
            c"fhir_sync.smart_previous_key_id",
            c"The kid of smart_previous_key_file.",
            c"Empty: the key's RFC 7638 thumbprint.",
            &SMART_PREVIOUS_KEY_ID,
            GucFlags::default(),
        ),
        (
            c"fhir_sync.tls_client_cert_file",
            c"Mutual TLS: PEM certificate chain presented to the FHIR server.",
            c"With tls_client_key_file. The server's certificate is still verified (ca_file or the web roots).",
            &TLS_CLIENT_CERT_FILE,
            GucFlags::SUPERUSER_ONLY,
        ),
        (
            c"fhir_sync.tls_client_key_file",
            c"Mutual TLS: PEM private key of tls_client_cert_file.",
            c"Unencrypted, private to the PostgreSQL OS user (mode 0600); read at start and at every reload.",
            &TLS_CLIENT_KEY_FILE,
            GucFlags::SUPERUSER_ONLY,
        ),
    ] {
        GucRegistry::define_string_guc(name, short, long, setting, Sighup, flags);
    }
    GucRegistry::define_enum_guc(
        c"fhir_sync.write_mode",
        c"How resources are written, for tables tracked without a write_mode: upsert, create or create_only.",
        c"upsert: conditional update by identifier, then by id. create: POST with If-None-Exist, then updates by id (servers without update-as-create). create_only: POST with If-None-Exist only; a later change of a created resource is dead-lettered as not_sendable.",
        &WRITE_MODE,
        Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"fhir_sync.max_requests_per_second",
        c"Cap on requests per second to the FHIR server, all workers together (0: none).",
        c"Requests (a Bundle is one) are spaced at least 1/cap apart, with a 5 % margin, so the server never sees more than the cap in any second.",
        &MAX_REQUESTS_PER_SECOND,
        0.0,
        100_000.0,
        Sighup,
        GucFlags::default(),
    );
}

fn string(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .and_then(|c| c.into_string().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

pub fn server_url() -> Option<String> {
    string(&SERVER_URL).map(|s| s.trim_end_matches('/').to_string())
}
pub fn databases() -> Vec<String> {
    string(&DATABASE)
        .unwrap_or_default()
        .split(',')
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .collect()
}
pub fn username() -> Option<String> {
    string(&USERNAME)
}
pub fn lock_timeout_ms() -> i32 {
    LOCK_TIMEOUT.get()
}
pub fn statement_timeout_ms() -> i32 {
    STATEMENT_TIMEOUT.get()
}
pub fn allow_http_credentials() -> bool {
    ALLOW_HTTP_CREDENTIALS.get()
}
pub fn workers() -> usize {
    WORKERS.get().max(0) as usize
}
/// Resources claimed per cycle: fhir_sync.batch_size, but at least enough to fill every Bundle
/// that may be in flight at once (bundle_size × max_in_flight).
/// Resources per claim: at least what the Bundles in flight carry, and at most half of what a
/// worker's lease slot holds, so that the batch claimed ahead always fits beside the one in flight.
pub fn batch_size() -> i64 {
    let bundles = BUNDLE_SIZE.get().max(0) as i64 * max_in_flight() as i64;
    (BATCH_SIZE.get() as i64)
        .max(bundles)
        .min(fhir_sync_core::lease::PER_WORKER as i64 / 2)
}
pub fn max_retries() -> i32 {
    MAX_RETRIES.get()
}
pub fn http_timeout() -> std::time::Duration {
    std::time::Duration::from_millis(HTTP_TIMEOUT.get() as u64)
}
pub fn poll_interval() -> std::time::Duration {
    std::time::Duration::from_millis(POLL_INTERVAL.get() as u64)
}
pub fn linger() -> std::time::Duration {
    std::time::Duration::from_millis(LINGER.get() as u64)
}
pub fn lease_time_ms() -> i64 {
    LEASE_TIME.get() as i64
}
pub fn max_in_flight() -> usize {
    MAX_IN_FLIGHT.get().max(1) as usize
}
pub fn identifier_system() -> String {
    string(&IDENTIFIER_SYSTEM).unwrap_or_else(|| "urn:fhir-sync".into())
}
pub fn dependency_timeout_s() -> i64 {
    DEPENDENCY_TIMEOUT.get() as i64
}
pub fn capture_payload() -> bool {
    CAPTURE_PAYLOAD.get()
}
pub fn auth() -> AuthMode {
    AUTH.get()
}
/// fhir_sync.auth as it is written in SQL.
pub fn auth_name() -> &'static str {
    match AUTH.get() {
        AuthMode::None => "none",
        AuthMode::Bearer => "bearer",
        AuthMode::Basic => "basic",
        AuthMode::Oauth2 => "oauth2",
        AuthMode::SmartBackend => "smart_backend",
    }
}
pub fn auth_token() -> Result<Option<String>, String> {
    secret(&AUTH_TOKEN, &AUTH_TOKEN_FILE, "fhir_sync.auth_token_file")
}
pub fn auth_username() -> Option<String> {
    string(&AUTH_USERNAME)
}
pub fn auth_password() -> Result<Option<String>, String> {
    secret(
        &AUTH_PASSWORD,
        &AUTH_PASSWORD_FILE,
        "fhir_sync.auth_password_file",
    )
}
pub fn oauth_token_url() -> Option<String> {
    string(&OAUTH_TOKEN_URL)
}
pub fn oauth_client_id() -> Option<String> {
    string(&OAUTH_CLIENT_ID)
}
pub fn oauth_client_secret() -> Result<Option<String>, String> {
    secret(
        &OAUTH_CLIENT_SECRET,
        &OAUTH_CLIENT_SECRET_FILE,
        "fhir_sync.oauth_client_secret_file",
    )
}

/// A secret from its file when one is set, else from its setting. The error names the file,
/// never its content.
fn secret(
    plain: &GucSetting<Option<CString>>,
    file: &GucSetting<Option<CString>>,
    file_setting: &str,
) -> Result<Option<String>, String> {
    match string(file) {
        Some(path) => read_secret_file(std::path::Path::new(&path))
            .map(Some)
            .map_err(|e| format!("{file_setting} \"{path}\": {e}")),
        None => Ok(string(plain)),
    }
}

/// A file holding a secret, which must be readable by its owner only (as PostgreSQL demands of
/// ssl_key_file): a secret that other OS users can read is not one.
pub fn read_private_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err("has group or world access; it must be mode 0600 or 0400 (chmod 600)".into());
    }
    std::fs::read(path).map_err(|e| e.to_string())
}

/// The first line of a secret file (see [`read_private_file`]).
pub fn read_secret_file(path: &std::path::Path) -> Result<String, String> {
    let bytes = read_private_file(path)?;
    let text = String::from_utf8(bytes).map_err(|_| "is not text".to_string())?;
    let first = text.lines().next().unwrap_or("").trim();
    if first.is_empty() {
        return Err("is empty".into());
    }
    Ok(first.to_string())
}
pub fn oauth_scope() -> Option<String> {
    string(&OAUTH_SCOPE)
}
pub fn ca_file() -> Option<String> {
    string(&CA_FILE)
}
pub fn write_mode() -> WriteMode {
    WRITE_MODE.get()
}
pub fn max_requests_per_second() -> f64 {
    MAX_REQUESTS_PER_SECOND.get().max(0.0)
}

/// A SMART signing key: from `file`, named `kid`; None when the file setting is empty. The
/// error names the setting and file, never the content.
fn smart_key(
    file: &GucSetting<Option<CString>>,
    kid: &GucSetting<Option<CString>>,
    setting: &str,
) -> Result<Option<fhir_sync_core::smart::SigningKey>, String> {
    let Some(path) = string(file) else {
        return Ok(None);
    };
    let pem = read_private_file(std::path::Path::new(&path))
        .map_err(|e| format!("{setting} \"{path}\": {e}"))?;
    fhir_sync_core::smart::SigningKey::from_pem(&pem, string(kid).as_deref())
        .map(Some)
        .map_err(|e| format!("{setting} \"{path}\" {e}"))
}
/// The key that signs (fhir_sync.smart_key_file).
pub fn smart_signing_key() -> Result<Option<fhir_sync_core::smart::SigningKey>, String> {
    smart_key(&SMART_KEY_FILE, &SMART_KEY_ID, "fhir_sync.smart_key_file")
}
/// The key being rotated out (fhir_sync.smart_previous_key_file).
pub fn smart_previous_key() -> Result<Option<fhir_sync_core::smart::SigningKey>, String> {
    smart_key(
        &SMART_PREVIOUS_KEY_FILE,
        &SMART_PREVIOUS_KEY_ID,
        "fhir_sync.smart_previous_key_file",
    )
}
/// A certificate chain and its private key, PEM.
pub type CertAndKey = (Vec<u8>, Vec<u8>);

/// Mutual TLS: the certificate chain and the (private) key; None when not configured.
pub fn tls_client_cert() -> Result<Option<CertAndKey>, String> {
    match (string(&TLS_CLIENT_CERT_FILE), string(&TLS_CLIENT_KEY_FILE)) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => {
            let chain = std::fs::read(&cert)
                .map_err(|e| format!("fhir_sync.tls_client_cert_file \"{cert}\": {e}"))?;
            let key_pem = read_private_file(std::path::Path::new(&key))
                .map_err(|e| format!("fhir_sync.tls_client_key_file \"{key}\": {e}"))?;
            Ok(Some((chain, key_pem)))
        }
        _ => Err(
            "fhir_sync.tls_client_cert_file and fhir_sync.tls_client_key_file must be set together"
                .into(),
        ),
    }
}

pub fn bundle_size() -> usize {
    BUNDLE_SIZE.get().max(0) as usize
}
pub fn bundle_type() -> BundleType {
    BUNDLE_TYPE.get()
}

#[cfg(test)]
mod tests {
    use super::read_secret_file;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_secret_file_must_be_private_and_gives_its_first_line() {
        let dir = std::env::temp_dir().join(format!("fhir_sync_secret_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "s3cret-token\n# comment\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_secret_file(&f).unwrap_err();
        assert!(e.contains("group or world access"), "{e}");
        assert!(!e.contains("s3cret"), "the error never shows the secret");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_file(&f).unwrap(), "s3cret-token");
        std::fs::write(&f, "\n").unwrap();
        assert_eq!(read_secret_file(&f).unwrap_err(), "is empty");
        assert!(read_secret_file(&dir.join("missing")).is_err());
        assert_eq!(read_secret_file(&dir).unwrap_err(), "not a regular file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
