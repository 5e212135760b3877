//! Catalog rows read through the syscache, in C: no SQL, so nothing resolves through anyone's
//! search_path, and it works where no SQL can run (the launcher, the ProcessUtility hook).

use pgrx::pg_sys;

/// Reads one syscache row's fixed-size part as `T` (its catalog's `FormData_*` struct) and hands
/// it to `read`; None when there is no such row.
///
/// # Safety
/// `T` must be the `FormData_*` struct of `cache`'s catalog, and `key` a datum of the cache's key
/// type; a transaction must be in progress. `read` must copy out what it needs: the tuple is
/// released when it returns.
// SAFETY: each caller names the FormData struct of the cache it looks up, with an OID key (or,
// for AUTHNAME, a C string, as PostgreSQL's own lookups pass), inside its transaction.
pub unsafe fn row<T, R>(
    cache: pg_sys::SysCacheIdentifier::Type,
    key: pg_sys::Datum,
    read: impl FnOnce(&T) -> R,
) -> Option<R> {
    // SAFETY: per the contract; the tuple is pinned until ReleaseSysCache, and its data begins
    // t_hoff (MAXALIGNed) bytes into its header; `R` cannot hold a reference into it (its type
    // does not name the borrow), and a panic in `read` leaves the pin to the resource owner.
    unsafe {
        let tup = pg_sys::SearchSysCache1(cache as _, key);
        if tup.is_null() {
            return None;
        }
        let header = (*tup).t_data;
        let form = &*((header as *const u8).add((*header).t_hoff as usize) as *const T);
        let out = read(form);
        pg_sys::ReleaseSysCache(tup);
        Some(out)
    }
}
