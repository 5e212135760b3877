//! fhir_sync keeps a FHIR server in sync with clinical tables, from inside PostgreSQL.
//!
//! The path one change travels, module by module:
//!   capture (trigger → fhir_outbox, commit wakes the worker)
//!   → worker::claim (lease pending changes per resource)
//!   → worker::map (read rows as they stand now → FHIR JSON, via `mapping`)
//!   → worker::send (conditional PUT / DELETE over `http`)
//!   → worker::settle (delivered | retry later | fhir_dlq), classified by worker::policy.

use pgrx::prelude::*;

mod api;
mod capture;
mod catalog;
mod error;
mod gucs;
mod launcher;
mod metrics;
mod outbox_write;
mod plans;
mod sandbox;
mod shmem;
mod source;
mod subxact;
mod utility;
mod worker;

// The pure layer, under its old paths: `crate::mapping`, `crate::http`, `crate::threads`.
use fhir_sync_core::{http, mapping, threads};

pgrx::pg_module_magic!(name, version);

/// Rust's allocations (JSON values, request bodies, responses) only; PostgreSQL's memory
/// contexts are untouched. Built with local-dynamic TLS (Cargo.toml): its default, initial-exec,
/// made the library need static TLS, of which a dlopened library gets only what glibc keeps
/// spare, shared with every other preloaded library — PostgreSQL 17 on Debian trixie refused to
/// load it ("cannot allocate memory in static TLS block").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!(
    "../sql/track.sql",
    name = "track",
    requires = ["schema", api::fhir_mapper_names]
);
extension_sql_file!("../sql/admin.sql", name = "admin", requires = ["schema"]);
extension_sql_file!(
    "../sql/views.sql",
    name = "views",
    requires = [
        "schema",
        "admin",
        api::fhir_sync_stats,
        api::fhir_sync_worker_slots,
        api::fhir_sync_server_capabilities
    ]
);
extension_sql_file!("../sql/privileges.sql", name = "privileges", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain read of a bool PostgreSQL sets around loading shared_preload_libraries,
    // on the one thread that loads libraries.
    if unsafe { !pg_sys::process_shared_preload_libraries_in_progress } {
        error::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "fhir_sync must be loaded via shared_preload_libraries",
            "Add fhir_sync to shared_preload_libraries in postgresql.conf and restart PostgreSQL.",
        );
    }
    // pgrx appends a captured Rust backtrace to the DETAIL of every error that crosses its guard
    // when RUST_BACKTRACE is set — and the ProcessUtility hook makes every utility statement's
    // error cross it. Users read DETAIL; backtraces belong in a debugger. (Runs in the
    // postmaster before any thread exists; an explicit RUST_LIB_BACKTRACE is respected.)
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    gucs::init();
    shmem::init();
    launcher::register();
}

/// Settings for the cluster that `cargo pgrx test` starts.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'fhir_sync'",
            "fhir_sync.workers = 0",
        ]
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("tests.rs");
}
