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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    fn wait_for(what: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !what() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "pool jobs did not finish"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn idle() -> usize {
        pool().queue.lock().unwrap().idle
    }

    #[test]
    fn every_job_runs_once_and_threads_are_reused() {
        let done = Arc::new(AtomicUsize::new(0));
        let threads = Arc::new(Mutex::new(std::collections::HashSet::new()));
        for round in 0..20 {
            for _ in 0..4 {
                let (done, threads) = (done.clone(), threads.clone());
                run(move || {
                    threads.lock().unwrap().insert(std::thread::current().id());
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
            wait_for(|| done.load(Ordering::SeqCst) == (round + 1) * 4);
            // Give the threads a moment to go back to waiting. (Other tests share the pool: one
            // of theirs may hold a thread a while, e.g. printing a panic's backtrace.)
            let t0 = Instant::now();
            while idle() < 4 && t0.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // 80 jobs, never more than 4 at once: a thread per job would have made 80.
        let used = threads.lock().unwrap().len();
        assert!(used <= 16, "{used} threads ran 80 jobs");
    }

    #[test]
    fn a_stuck_job_does_not_hold_up_the_next() {
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let r = release.clone();
        run(move || {
            let (m, c) = &*r;
            let mut go = m.lock().unwrap();
            while !*go {
                go = c.wait(go).unwrap();
            }
        });
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        run(move || {
            d.fetch_add(1, Ordering::SeqCst);
        });
        wait_for(|| done.load(Ordering::SeqCst) == 1);
        let (m, c) = &*release;
        *m.lock().unwrap() = true;
        c.notify_all();
    }

    #[test]
    fn a_panicking_job_leaves_the_pool_working() {
        run(|| panic!("job failed"));
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        run(move || {
            d.fetch_add(1, Ordering::SeqCst);
        });
        wait_for(|| done.load(Ordering::SeqCst) == 1);
    }
}
