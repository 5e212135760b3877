//! fhir_sync's logic that needs no PostgreSQL, so that `cargo test -p fhir_sync_core` checks it
//! in seconds: rows to FHIR resources (`mapping`), the HTTP client and its answers (`http`,
//! `response`), sending a tier of requests (`send`, on the threads of `pool`), and the decisions
//! the worker takes about them (`policy`, `verdict`, `pause`, `pace`, `floor`).
//!
//! Nothing here may call into PostgreSQL: the sending threads run this code, and PostgreSQL is
//! single-threaded. The extension crate applies the decisions (SQL, shared memory, the log).

pub mod capability;
pub mod floor;
pub mod http;
pub mod identity;
pub mod lease;
pub mod mapping;
pub mod pace;
pub mod pause;
pub mod policy;
pub mod pool;
pub mod rate;
pub mod response;
pub mod send;
pub mod smart;
pub mod threads;
pub mod verdict;
