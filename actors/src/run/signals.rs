//! Signals of a run (SIGINT, SIGTERM, SIGHUP). The first one goes to the run's own handler
//! ([`Shutdown::install_signal_handler`]), which drains the pipeline and stops cleanly; this module only notes which
//! signal it was, so that the exit code is 128 + its number, as a shell reports a process that signal killed (130 for
//! Ctrl-C, 143 for `kill`/SIGTERM, 129 for SIGHUP). A second signal exits at once, with 128 + its own number.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::OnceLock;

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
/// The first signal received during the current run (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// Write end of the self-pipe through which the handler reports a second signal.
static PIPE_W: AtomicI32 = AtomicI32::new(-1);
/// The handlers installed before ours (the run's clean-stop handler), per entry of `SIGNALS`.
static PREVIOUS: [AtomicUsize; 3] = [
    AtomicUsize::new(0),
    AtomicUsize::new(0),
    AtomicUsize::new(0),
];

pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

/// 128 + `sig` (130, SIGINT's, when unknown).
pub fn exit_code(sig: Option<i32>) -> u8 {
    sig.and_then(|s| u8::try_from(128 + s).ok()).unwrap_or(130)
}

/// The first signal of the current run.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Starts a run's signal bookkeeping; the handlers go in (once per process) on top of the ones installed before.
pub fn install() -> Result<(), String> {
    RECEIVED.store(0, Ordering::SeqCst);
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED.get_or_init(install_handlers).clone()
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Async-signal-safe only: atomics, write(2), and the previous handler (itself a signal handler).
    let first = RECEIVED
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    if first {
        let i = SIGNALS.iter().position(|&s| s == sig).unwrap_or(0);
        let prev = PREVIOUS[i].load(Ordering::SeqCst);
        if prev != libc::SIG_DFL && prev != libc::SIG_IGN {
            // SAFETY: `prev` is the one-argument handler sigaction returned for this signal.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev) };
            f(sig);
            return;
        }
    }
    // A second signal (or no clean-stop handler): the dispatcher thread exits. High bit: a second signal.
    let fd = PIPE_W.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = (sig as u8 & 0x7f) | if first { 0 } else { 0x80 };
        // SAFETY: writes one byte from a valid stack buffer to the pipe this module owns.
        unsafe {
            libc::write(fd, (&b as *const u8).cast(), 1);
        }
    }
}

fn install_handlers() -> Result<(), String> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two descriptors for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    let (r, w) = (fds[0], fds[1]);
    // The handler must never block: its end is non-blocking (one byte per signal never fills the pipe anyway).
    // SAFETY: fcntl on a descriptor just created.
    unsafe {
        let fl = libc::fcntl(w, libc::F_GETFL);
        libc::fcntl(w, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    PIPE_W.store(w, Ordering::SeqCst);
    std::thread::Builder::new()
        .name("lexflow-signals".into())
        .spawn(move || loop {
            let mut b = 0u8;
            // SAFETY: reads one byte into a valid stack buffer from the pipe's read end, owned by this thread.
            let n = unsafe { libc::read(r, (&mut b as *mut u8).cast(), 1) };
            match n {
                1 => forced_exit(i32::from(b & 0x7f), b & 0x80 != 0),
                n if n < 0
                    && std::io::Error::last_os_error().kind()
                        == std::io::ErrorKind::Interrupted => {}
                _ => return,
            }
        })
        .map_err(|e| e.to_string())?;
    for (i, sig) in SIGNALS.into_iter().enumerate() {
        // SAFETY: a zeroed sigaction with a valid handler and an empty mask is a valid argument; `old` receives
        // the previous disposition.
        let (rc, old) = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            let mut old: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            (libc::sigaction(sig, &sa, &mut old), old)
        };
        if rc != 0 {
            return Err(format!(
                "sigaction({}): {}",
                name(sig),
                std::io::Error::last_os_error()
            ));
        }
        // A three-argument (SA_SIGINFO) handler cannot be called as a one-argument one: treat it as none.
        let prev = match old.sa_flags & libc::SA_SIGINFO {
            0 => old.sa_sigaction,
            _ => libc::SIG_DFL,
        };
        PREVIOUS[i].store(prev, Ordering::SeqCst);
    }
    Ok(())
}

fn forced_exit(sig: i32, second: bool) -> ! {
    let code = exit_code(Some(sig));
    match second {
        true => tracing::error!(
            "{} received while the run was stopping: forced exit (code {code}) without draining the pipeline \
             or writing stats.json; continue from the last checkpoint with --resume",
            name(sig)
        ),
        false => tracing::error!("{} received: exiting (code {code})", name(sig)),
    }
    // _exit: no atexit handlers or static destructors (libtorch's would tear down under the running trainer
    // threads and crash instead of exiting with `code`). The log went to stderr, which is unbuffered.
    // SAFETY: _exit ends the process; nothing is used afterwards.
    unsafe { libc::_exit(i32::from(code)) }
}
