//! Errors raised to SQL callers (track, preview, capture). Each maps to a SQLSTATE, a
//! PostgreSQL-style lowercase message and, where the user can act, a full-sentence hint.
//! Errors of the delivery path are not here: they are settled, not raised (see worker::policy).
//!
//! A PostgreSQL error caught inside fhir_sync (`subxact`, `sandbox`) becomes a [`PgError`]: it
//! keeps its SQLSTATE, message, detail and hint, so the worker can tell a lock timeout from a
//! dropped extension, and logs can name the SQLSTATE without PostgreSQL's message text (which
//! may quote a row's values: `invalid input syntax for type integer: "Jane"`).

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgSqlErrorCode;

#[derive(Clone, Debug)]
pub enum FhirSyncError {
    BadTrigger(usize),
    /// fhir_capture fired other than AFTER … FOR EACH ROW.
    NotAfterRow,
    NullKey(String),
    /// Something that cannot happen did (an SPI call refused): a bug, SQLSTATE XX000.
    Internal(String),
    /// The extension's own objects are missing or altered (dropped under a running session,
    /// edited by hand): SQLSTATE 55000, object_not_in_prerequisite_state.
    Broken(String),
    NotTracked(String),
    NoPrimaryKey(String),
    NoBuiltInMapper {
        table: String,
        resource_type: String,
    },
    RowNotFound {
        table: String,
        key: String,
    },
    Map(crate::mapping::MapError),
    MapFunction(String),
    /// The caller may not read a table that fhir_sync would read for it.
    NoPrivilege(String),
    /// Not attempted this time, for the reason given (another row of its batch used up the
    /// time); retried later.
    Deferred(String),
    /// A PostgreSQL error caught while fhir_sync ran a statement.
    Pg(Box<PgError>),
    /// A row of a tracked table could not be read (a cast of one of its columns failed, it is
    /// beyond JSON, the owner's code timed out). Names the row, never its values.
    Unreadable {
        table: String,
        key: String,
        error: Box<PgError>,
    },
    /// A tracked table's mapping function raised an error for a row (its SQLSTATE kept; its message,
    /// which may quote the row, is not part of this error's text).
    MapFunctionFailed {
        table: String,
        key: String,
        error: Box<PgError>,
    },
}

/// A caught PostgreSQL error, with what PostgreSQL said about it.
#[derive(Clone, Debug, PartialEq)]
pub struct PgError {
    pub code: PgSqlErrorCode,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    pub fn from_caught(e: pgrx::pg_sys::panic::CaughtError) -> PgError {
        use pgrx::pg_sys::panic::CaughtError::*;
        match e {
            PostgresError(r) | ErrorReport(r) | RustPanic { ereport: r, .. } => PgError {
                code: r.sql_error_code(),
                message: r.message().to_string(),
                detail: r.detail().map(str::to_string),
                hint: r.hint().map(str::to_string),
            },
        }
    }

    /// The five-character SQLSTATE ("55P03").
    pub fn sqlstate(&self) -> String {
        sqlstate(self.code)
    }

    /// Cancelled by fhir_sync.statement_timeout (or a DBA's pg_cancel_backend).
    pub fn is_timeout(&self) -> bool {
        self.code == PgSqlErrorCode::ERRCODE_QUERY_CANCELED
    }

    /// Lock not granted within lock_timeout: the object is busy, not broken.
    pub fn is_lock_timeout(&self) -> bool {
        self.code == PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE
    }

    /// What may be logged: the SQLSTATE and its condition name, never the message text.
    pub fn log_form(&self) -> String {
        match condition_name(self.code) {
            Some(n) => format!("SQLSTATE {} ({n})", self.sqlstate()),
            None => format!("SQLSTATE {}", self.sqlstate()),
        }
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.sqlstate())
    }
}

/// Unpacks PostgreSQL's six-bit encoding of a SQLSTATE (MAKE_SQLSTATE).
pub fn sqlstate(code: PgSqlErrorCode) -> String {
    let n = code as isize as u32;
    (0..5)
        .map(|i| (((n >> (6 * i)) & 0x3F) as u8 + b'0') as char)
        .collect()
}

/// Condition names of the SQLSTATEs the worker meets and acts on; others are logged by code.
fn condition_name(code: PgSqlErrorCode) -> Option<&'static str> {
    use PgSqlErrorCode::*;
    Some(match code {
        ERRCODE_LOCK_NOT_AVAILABLE => "lock_not_available",
        ERRCODE_QUERY_CANCELED => "query_canceled",
        ERRCODE_T_R_SERIALIZATION_FAILURE => "serialization_failure",
        ERRCODE_T_R_DEADLOCK_DETECTED => "deadlock_detected",
        ERRCODE_UNDEFINED_TABLE => "undefined_table",
        ERRCODE_UNDEFINED_FUNCTION => "undefined_function",
        ERRCODE_UNDEFINED_COLUMN => "undefined_column",
        ERRCODE_INSUFFICIENT_PRIVILEGE => "insufficient_privilege",
        ERRCODE_INVALID_TEXT_REPRESENTATION => "invalid_text_representation",
        ERRCODE_PROGRAM_LIMIT_EXCEEDED => "program_limit_exceeded",
        ERRCODE_OUT_OF_MEMORY => "out_of_memory",
        ERRCODE_STATEMENT_TOO_COMPLEX => "statement_too_complex",
        ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE => "numeric_value_out_of_range",
        ERRCODE_UNTRANSLATABLE_CHARACTER => "untranslatable_character",
        ERRCODE_RAISE_EXCEPTION => "raise_exception",
        ERRCODE_INTERNAL_ERROR => "internal_error",
        _ => return None,
    })
}

impl std::fmt::Display for FhirSyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use FhirSyncError::*;
        match self {
            BadTrigger(n) => write!(f, "fhir_capture trigger has {n} arguments, expected 6"),
            NotAfterRow => write!(f, "fhir_capture must fire AFTER each row"),
            NullKey(t) => write!(f, "row of tracked table {t} has a null primary key"),
            Internal(e) => write!(f, "fhir_sync internal error: {e}"),
            Broken(e) => write!(f, "fhir_sync's own objects are not as it made them: {e}"),
            NotTracked(t) => write!(f, "table {t} is not tracked by fhir_sync"),
            NoPrimaryKey(t) => write!(f, "table {t} has no single-column primary key"),
            NoBuiltInMapper {
                table,
                resource_type,
            } => {
                write!(f, "table {table} has no built-in {resource_type} mapping")
            }
            RowNotFound { table, key } => write!(f, "{table} has no row with key {key}"),
            Map(e) => write!(f, "{e}"),
            MapFunction(e) => write!(f, "{e}"),
            NoPrivilege(t) => write!(f, "permission denied for table {t}"),
            Deferred(why) => write!(f, "{why}"),
            Pg(e) => write!(f, "{e}"),
            Unreadable { table, key, error } => write!(
                f,
                "{table} row {key} cannot be read (SQLSTATE {})",
                error.sqlstate()
            ),
            MapFunctionFailed { table, key, error } => write!(
                f,
                "mapping function of {table} failed for row {key} (SQLSTATE {})",
                error.sqlstate()
            ),
        }
    }
}

impl std::error::Error for FhirSyncError {}

impl FhirSyncError {
    fn code(&self) -> PgSqlErrorCode {
        use FhirSyncError::*;
        match self {
            BadTrigger(_) | NotAfterRow => PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
            NullKey(_) => PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
            Internal(_) => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            Broken(_) => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            NotTracked(_) | RowNotFound { .. } => PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
            NoPrimaryKey(_) => PgSqlErrorCode::ERRCODE_INVALID_TABLE_DEFINITION,
            NoBuiltInMapper { .. } => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Map(_) | MapFunction(_) => PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
            NoPrivilege(_) => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            Deferred(_) => PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
            Pg(e) | Unreadable { error: e, .. } | MapFunctionFailed { error: e, .. } => e.code,
        }
    }

    fn hint(&self) -> Option<String> {
        use FhirSyncError::*;
        if let NoBuiltInMapper {
            table,
            resource_type,
        } = self
        {
            let table = table.replace('\'', "''");
            return Some(format!(
                "Pass a function that turns a row into the resource: SELECT fhir_track('{table}', '{resource_type}', map_function => 'my_mapper({table})'::regprocedure)."
            ));
        }
        let hint = match self {
            BadTrigger(_) | NotAfterRow => Some("Recreate the trigger with SELECT fhir_untrack(...) and SELECT fhir_track(...)."),
            NotTracked(_) => Some("Start tracking it with SELECT fhir_track('table', 'ResourceType')."),
            NoPrimaryKey(_) => Some("Add a primary key on one column: fhir_sync addresses rows by it."),
            Broken(_) => Some("Undo the change to fhir_sync's objects; the installed SQL and fhir_sync.so must be of one version (ALTER EXTENSION fhir_sync UPDATE)."),
            Map(_) => Some("Correct the row; the change is retried when the row is updated or requeued."),
            Unreadable { .. } => Some("Read the row yourself to see the error; correct it, or the type's cast, then requeue."),
            _ => None,
        };
        hint.map(str::to_string)
    }

    /// What the worker may log: our own messages as they are, a caught PostgreSQL error by
    /// its SQLSTATE only.
    pub fn log_form(&self) -> String {
        match self {
            FhirSyncError::Pg(e) => e.log_form(),
            FhirSyncError::Unreadable { table, key, error } => {
                format!("{table} row {key} cannot be read: {}", error.log_form())
            }
            FhirSyncError::MapFunctionFailed { table, key, error } => format!(
                "mapping function of {table} failed for row {key}: {}",
                error.log_form()
            ),
            other => other.to_string(),
        }
    }

    /// The five-character SQLSTATE this error is raised (or was caught) with.
    pub fn sqlstate(&self) -> String {
        sqlstate(self.code())
    }

    /// The caught PostgreSQL error behind this one, if any.
    pub fn pg(&self) -> Option<&PgError> {
        match self {
            FhirSyncError::Pg(e)
            | FhirSyncError::Unreadable { error: e, .. }
            | FhirSyncError::MapFunctionFailed { error: e, .. } => Some(e),
            _ => None,
        }
    }

    pub fn report(self) -> ! {
        let mut report = ErrorReport::new(self.code(), self.to_string(), "fhir_sync");
        if let Some(h) = self.hint() {
            report = report.set_hint(h);
        }
        report.report(pgrx::PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

impl From<PgError> for FhirSyncError {
    fn from(e: PgError) -> Self {
        FhirSyncError::Pg(Box::new(e))
    }
}

impl From<pgrx::spi::SpiError> for FhirSyncError {
    fn from(e: pgrx::spi::SpiError) -> Self {
        FhirSyncError::Internal(e.to_string())
    }
}

/// Raises an ERROR with a hint; for the few errors that are not a FhirSyncError.
pub fn raise(code: PgSqlErrorCode, message: &str, hint: &str) -> ! {
    ErrorReport::new(code, message.to_string(), "fhir_sync")
        .set_hint(hint)
        .report(pgrx::PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Raises one of fhir_sync's errors from its SQL functions, so that each message, hint and
/// SQLSTATE is written once (here): `PERFORM fhir_raise('not_tracked', "table"::text)`.
#[pgrx::pg_extern]
fn fhir_raise(error: &str, subject: &str, resource_type: pgrx::default!(Option<&str>, "NULL")) {
    let subject = subject.to_string();
    match error {
        "not_tracked" => FhirSyncError::NotTracked(subject),
        "no_primary_key" => FhirSyncError::NoPrimaryKey(subject),
        "no_builtin_mapper" => FhirSyncError::NoBuiltInMapper {
            table: subject,
            resource_type: resource_type.unwrap_or_default().to_string(),
        },
        other => FhirSyncError::Internal(format!("fhir_raise: unknown error \"{other}\"")),
    }
    .report()
}
