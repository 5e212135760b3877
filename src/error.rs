//! Errors raised to SQL callers (track, preview, capture). Each maps to a SQLSTATE, a
//! PostgreSQL-style lowercase message and, where the user can act, a full-sentence hint.
//! Errors of the delivery path are not here: they are settled, not raised (see worker::policy).

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgSqlErrorCode;

#[derive(Debug)]
pub enum FhirSyncError {
    BadTrigger(usize),
    NullKey(String),
    Spi(String),
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
}

impl std::fmt::Display for FhirSyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use FhirSyncError::*;
        match self {
            BadTrigger(n) => write!(f, "fhir_capture trigger has {n} arguments, expected 6"),
            NullKey(t) => write!(f, "row of tracked table {t} has a null primary key"),
            Spi(e) => write!(f, "fhir_sync internal query failed: {e}"),
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
        }
    }
}

impl std::error::Error for FhirSyncError {}

impl FhirSyncError {
    fn code(&self) -> PgSqlErrorCode {
        use FhirSyncError::*;
        match self {
            BadTrigger(_) => PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
            NullKey(_) => PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
            Spi(_) => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            NotTracked(_) | RowNotFound { .. } => PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
            NoPrimaryKey(_) => PgSqlErrorCode::ERRCODE_INVALID_TABLE_DEFINITION,
            NoBuiltInMapper { .. } => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Map(_) | MapFunction(_) => PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        use FhirSyncError::*;
        match self {
            BadTrigger(_) => Some("Recreate the trigger with SELECT fhir_untrack(...) and SELECT fhir_track(...)."),
            NotTracked(_) => Some("Start tracking it with SELECT fhir_track('table', 'ResourceType')."),
            NoPrimaryKey(_) => Some("Add a primary key on one column: fhir_sync addresses rows by it."),
            NoBuiltInMapper { .. } => Some(
                "Pass a mapping function: SELECT fhir_track('table', 'Type', map_function => 'my_fn(my_table)'::regprocedure).",
            ),
            Map(_) => Some("Correct the row; the change is retried when the row is updated or requeued."),
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

impl From<pgrx::spi::SpiError> for FhirSyncError {
    fn from(e: pgrx::spi::SpiError) -> Self {
        FhirSyncError::Spi(e.to_string())
    }
}

/// Raises an ERROR with a hint; for the few errors that are not a FhirSyncError.
pub fn raise(code: PgSqlErrorCode, message: &str, hint: &str) -> ! {
    ErrorReport::new(code, message.to_string(), "fhir_sync")
        .set_hint(hint)
        .report(pgrx::PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}
