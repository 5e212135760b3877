//! In-database tests (`cargo pgrx test`). Each runs in a transaction that is rolled back, so
//! they test capture, mapping and the SQL surface; delivery is tested end to end in tests/e2e.
