//! Statements the worker runs every cycle, parsed and planned once per process.
//!
//! Under pgbench the worker runs a cycle every ~10 ms with a few dozen rows in it; parsing and
//! planning the same ten statements again each cycle was a quarter of its main thread's CPU
//! (perf, release build). A kept plan stays correct: PostgreSQL's plan cache re-plans it after
//! DDL or ANALYZE on the tables it reads, and checks privileges at every execution.

use pgrx::datum::DatumWithOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;

/// Enough for the worker's own statements and the row fetches of a few dozen tracked tables;
/// past it (tables tracked and untracked over a long life) the cache starts over.
const MAX_KEPT: usize = 256;

#[derive(Default)]
struct Kept {
    reading: HashMap<String, OwnedPreparedStatement>,
    writing: HashMap<String, OwnedPreparedStatement>,
}

thread_local! {
    static KEPT: RefCell<Kept> = RefCell::new(Kept::default());
}

/// Runs a read-only statement through this process's kept plan for `sql`.
pub fn select<'conn>(
    client: &SpiClient<'conn>,
    sql: &str,
    limit: Option<libc::c_long>,
    args: &[DatumWithOid],
) -> SpiResult<SpiTupleTable<'conn>> {
    keep(client, sql, false, args)?;
    // The plan is only read while it runs, and the statements kept here never call back into
    // this module, so the shared borrow cannot clash with the cache being filled.
    KEPT.with(|k| client.select(&k.borrow().reading[sql], limit, args))
}

/// Runs a statement that writes through this process's kept plan for `sql`.
pub fn update<'conn>(
    client: &mut SpiClient<'conn>,
    sql: &str,
    args: &[DatumWithOid],
) -> SpiResult<SpiTupleTable<'conn>> {
    keep(client, sql, true, args)?;
    KEPT.with(|k| client.update(&k.borrow().writing[sql], None, args))
}

/// Prepares and keeps `sql` unless it is kept already. The argument types are those of the
/// first call's arguments (a NULL argument carries its type too).
fn keep(client: &SpiClient<'_>, sql: &str, writing: bool, args: &[DatumWithOid]) -> SpiResult<()> {
    let kept = KEPT.with(|k| {
        let k = k.borrow();
        let map = if writing { &k.writing } else { &k.reading };
        map.contains_key(sql)
    });
    if kept {
        return Ok(());
    }
    let types: Vec<PgOid> = args.iter().map(|a| PgOid::from(a.oid())).collect();
    let stmt = if writing {
        client.prepare_mut(sql, &types)?
    } else {
        client.prepare(sql, &types)?
    }
    .keep();
    KEPT.with(|k| {
        let mut k = k.borrow_mut();
        if k.reading.len() + k.writing.len() >= MAX_KEPT {
            *k = Kept::default();
        }
        let map = if writing {
            &mut k.writing
        } else {
            &mut k.reading
        };
        map.insert(sql.to_string(), stmt);
    });
    Ok(())
}
