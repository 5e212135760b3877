//! The sending threads, kept for the worker's lifetime.
//!
//! Every send used to start its own threads: 1,092 thread starts in 8 s of pgbench, each with a
//! fresh stack and allocator heap, for requests that take a fraction of a millisecond against a
//! nearby server. Threads here wait for work instead (the worker's CPU per delivered row did not
//! move beyond the machine's noise: benches/README.md). They never call into PostgreSQL and start
//! with every signal blocked, so PostgreSQL's handlers keep running on the main thread only.
//!
//! A thread stuck in a request (a server that never answers, until the client's timeout) is
//! simply not idle: work submitted meanwhile starts another thread, so a hung request never
//! delays the next one, and the worker can leave without waiting for it.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    idle: usize,
}

#[derive(Default)]
struct Pool {
    queue: Mutex<Queue>,
    ready: Condvar,
}

static POOL: OnceLock<Pool> = OnceLock::new();

fn pool() -> &'static Pool {
    POOL.get_or_init(Pool::default)
}

/// Runs `job` on an idle sending thread, or on a new one when none is idle.
pub fn run(job: impl FnOnce() + Send + 'static) {
    let pool = pool();
    let mut q = pool.queue.lock().unwrap_or_else(|p| p.into_inner());
    q.jobs.push_back(Box::new(job));
    if q.idle >= q.jobs.len() {
        drop(q);
        pool.ready.notify_one();
    } else {
        drop(q);
        crate::threads::block_signals_around(|| {
            std::thread::spawn(move || serve(pool));
        });
    }
}

fn serve(pool: &'static Pool) {
    let mut q = pool.queue.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if let Some(job) = q.jobs.pop_front() {
            drop(q);
            // A panic in a job must not take the thread's slot with it silently: the job's
            // owner sees its result missing; the thread goes back to waiting.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            q = pool.queue.lock().unwrap_or_else(|p| p.into_inner());
        } else {
            q.idle += 1;
            q = pool.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            q.idle -= 1;
        }
    }
}
