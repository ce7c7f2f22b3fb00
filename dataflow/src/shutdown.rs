use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

/// Why a run is stopping early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Signal,
    Failure,
}

/// One flag shared by every actor of a run: sources check it between inputs and stop reading when set; the rest of the
/// pipeline then drains naturally as edges close.
#[derive(Clone, Default)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    reason: Arc<AtomicU8>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn request(&self, reason: StopReason) {
        self.reason.store(reason as u8 + 1, Ordering::SeqCst);
        self.flag.store(true, Ordering::SeqCst);
    }

    pub fn is_requested(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    pub fn reason(&self) -> Option<StopReason> {
        match self.reason.load(Ordering::SeqCst) {
            1 => Some(StopReason::Signal),
            2 => Some(StopReason::Failure),
            _ => None,
        }
    }

    /// Installs the Ctrl-C / SIGTERM handler (once per process) that requests a clean stop.
    pub fn install_signal_handler(&self) -> Result<(), String> {
        let me = self.clone();
        ctrlc::set_handler(move || {
            tracing::warn!(
                "signal received: draining the pipeline and stopping cleanly (send again to force)"
            );
            if me.is_requested() {
                std::process::exit(130);
            }
            me.request(StopReason::Signal);
        })
        .map_err(|e| e.to_string())
    }
}
