//! Threads of a PostgreSQL process (the sending threads, the sandbox's watchdog): they never call
//! into PostgreSQL, and they start with every signal blocked, so that PostgreSQL's signal
//! handlers keep running on the main thread only.

/// Runs `f` (which spawns threads) with every signal blocked, so the threads start with all
/// signals blocked; the calling thread's mask is restored afterwards.
pub fn block_signals_around(f: impl FnOnce()) {
    // SAFETY: pthread_sigmask only changes this thread's signal mask; the old mask is restored
    // before returning, and the sigset_t values are initialised by sigfillset / the call itself.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
}
