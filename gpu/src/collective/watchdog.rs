//! The collective watchdog's rules, apart from CUDA so that they are tested on any machine.
//!
//! NCCL calls return as soon as the work is enqueued; a peer rank that died (its process killed, its node gone) or
//! hangs leaves the survivors' kernels spinning forever, and the survivors' next host synchronisation never
//! returns — a multi-node job burns its allocation without a word. The NCCL collective therefore records a CUDA event
//! after each collective it enqueues, and a watchdog thread per communicator polls it and NCCL's asynchronous error
//! state ([`verdict`]): an NCCL error, a CUDA error, or a collective not finished after the timeout stops the process
//! with a message naming the rank, the operation and how long it waited (checkpoints are written atomically, so
//! `--resume` continues from the last one). The timeout is generous by default because a legitimate wait can be long:
//! peers wait in their next all-reduce while rank 0 writes a checkpoint.
//!
//! The same timeout ([`WatchdogConfig::from_env`]) bounds every read and write of the TCP collective of CPU ranks
//! ([`crate::TcpCollective`]), so a stopped or hung peer fails the run there too.

use std::time::Duration;

use crate::error::{GpuError, Result};

/// Environment variable: seconds a collective may stay unfinished, NCCL or TCP (0: no timeout; NCCL errors and closed
/// connections still stop the run).
pub const TIMEOUT_ENV: &str = "LEXFLOW_COLLECTIVE_TIMEOUT_S";
/// Default of [`TIMEOUT_ENV`]: 30 minutes (a checkpoint of a large model by rank 0 keeps the others waiting).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// What the watchdog does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchdogConfig {
    /// None: never time out.
    pub timeout: Option<Duration>,
    /// How often the event and the error state are polled.
    pub poll: Duration,
}

impl WatchdogConfig {
    /// From [`TIMEOUT_ENV`] (whole seconds).
    pub fn from_env() -> Result<Self> {
        Self::parse(std::env::var(TIMEOUT_ENV).ok().as_deref())
    }

    /// The value of [`TIMEOUT_ENV`] (None: not set).
    pub fn parse(value: Option<&str>) -> Result<Self> {
        let name = TIMEOUT_ENV;
        let timeout = match value.map(str::trim) {
            None | Some("") => Some(DEFAULT_TIMEOUT),
            Some(v) => match v.parse::<u64>() {
                Ok(0) => None,
                Ok(s) => Some(Duration::from_secs(s)),
                Err(_) => {
                    return Err(GpuError::Collective {
                        rank: 0,
                        message: format!(
                            "{name}={v:?}: expected whole seconds (0 = no timeout; default {})",
                            DEFAULT_TIMEOUT.as_secs()
                        ),
                    })
                }
            },
        };
        Ok(WatchdogConfig {
            timeout,
            poll: Duration::from_secs(1),
        })
    }
}

/// One look at a communicator.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// Every collective enqueued so far has finished (or none was).
    Idle,
    /// The oldest unfinished collective: its name and how long ago it was enqueued.
    Pending { op: &'static str, age: Duration },
    /// Querying the event failed: a CUDA error (sticky errors of earlier launches surface here too).
    CudaError(String),
}

/// The message that stops the process, or None while all is well. `async_error`: NCCL's asynchronous error state
/// of the communicator (`ncclCommGetAsyncError`), None when it is `ncclSuccess`.
pub fn verdict(
    rank: usize,
    probe: &Probe,
    async_error: Option<&str>,
    cfg: &WatchdogConfig,
) -> Option<String> {
    const THEN: &str =
        "the run stops here; checkpoints are intact: fix the failing rank (its own log says why) \
                        and start again with `--resume`";
    if let Some(e) = async_error {
        return Some(format!(
            "rank {rank}: NCCL reports an error on the communicator ({e}): a peer rank died or its connection \
             broke; {THEN}"
        ));
    }
    match probe {
        Probe::Idle => None,
        Probe::CudaError(e) => Some(format!(
            "rank {rank}: CUDA error while waiting for a collective ({e}); {THEN}"
        )),
        Probe::Pending { op, age } => match cfg.timeout {
            Some(t) if *age >= t => Some(format!(
                "rank {rank}: {op} not finished after {} s (timeout {} s, {TIMEOUT_ENV}): a peer rank is gone \
                 or stuck; {THEN}",
                age.as_secs(),
                t.as_secs()
            )),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_from_the_environment_value() {
        assert_eq!(
            WatchdogConfig::parse(None).unwrap().timeout,
            Some(DEFAULT_TIMEOUT)
        );
        assert_eq!(
            WatchdogConfig::parse(Some("90")).unwrap().timeout,
            Some(Duration::from_secs(90))
        );
        assert_eq!(WatchdogConfig::parse(Some("0")).unwrap().timeout, None);
        let e = WatchdogConfig::parse(Some("10m")).unwrap_err().to_string();
        assert!(e.contains(TIMEOUT_ENV) && e.contains("10m"), "{e}");
    }

    #[test]
    fn stops_on_errors_and_on_a_collective_older_than_the_timeout_only() {
        let cfg = WatchdogConfig::parse(Some("60")).unwrap();
        let pending = |s| Probe::Pending {
            op: "ncclAllReduce",
            age: Duration::from_secs(s),
        };
        assert_eq!(verdict(1, &Probe::Idle, None, &cfg), None);
        assert_eq!(verdict(1, &pending(59), None, &cfg), None);
        let m = verdict(1, &pending(60), None, &cfg).unwrap();
        assert!(
            m.contains("rank 1") && m.contains("ncclAllReduce") && m.contains("--resume"),
            "{m}"
        );
        let m = verdict(3, &Probe::Idle, Some("ncclRemoteError"), &cfg).unwrap();
        assert!(m.contains("rank 3") && m.contains("ncclRemoteError"), "{m}");
        let m = verdict(
            0,
            &Probe::CudaError("CUDA_ERROR_LAUNCH_FAILED".into()),
            None,
            &cfg,
        )
        .unwrap();
        assert!(m.contains("CUDA_ERROR_LAUNCH_FAILED"), "{m}");
        // Without a timeout only errors stop the run.
        let never = WatchdogConfig::parse(Some("0")).unwrap();
        assert_eq!(verdict(0, &pending(1_000_000), None, &never), None);
    }
}
