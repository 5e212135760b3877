//! Threads of a PostgreSQL process (the sending threads, the sandbox's watchdog): they never call
//! into PostgreSQL, and they start with every signal blocked, so that PostgreSQL's signal
//! handlers keep running on the main thread only.

/// Runs `f` (which spawns threads) with every signal blocked, so the threads start with all
/// signals blocked; the calling thread's mask is restored afterwards, also when `f` panics
/// (thread::spawn does when no thread can be made): the main thread must never be left deaf to
/// SIGTERM, SIGINT and the timeout signal.
pub fn block_signals_around(f: impl FnOnce()) {
    struct Restore(libc::sigset_t);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: puts back the mask saved below; affects this thread only.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
        }
    }
    // SAFETY: pthread_sigmask changes this thread's mask only; both sigset_t values are
    // initialised (sigfillset, and the call itself for the old mask) before they are read.
    let _restore = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        Restore(old)
    };
    f();
}
