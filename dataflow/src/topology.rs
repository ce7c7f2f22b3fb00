use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::shutdown::{Shutdown, StopReason};

/// Error an actor returns: any error type, rendered with its whole cause chain.
pub type ActorError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Handed to every actor: its name, the run's shutdown flag, and a slot saying which input it is on, so a failure can
/// be reported as "actor `reader-0` failed on `corpus/a.xml`: …".
#[derive(Clone)]
pub struct ActorContext {
    name: Arc<str>,
    shutdown: Shutdown,
    input: Arc<Mutex<String>>,
}

impl ActorContext {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// True once a stop was requested (signal or another actor's failure).
    pub fn should_stop(&self) -> bool {
        self.shutdown.is_requested()
    }

    /// Records what the actor is working on now (a file, a batch sequence number…).
    pub fn set_input(&self, what: impl Into<String>) {
        if let Ok(mut g) = self.input.lock() {
            *g = what.into();
        }
    }

    fn input(&self) -> String {
        self.input.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

/// A failed run: which actor, on which input, and why.
#[derive(Debug, thiserror::Error)]
#[error("actor `{actor}` failed{}: {message}", on_input(.input))]
pub struct RunError {
    pub actor: String,
    pub input: String,
    pub message: String,
    pub panicked: bool,
}

fn on_input(input: &str) -> String {
    if input.is_empty() {
        String::new()
    } else {
        format!(" while on {input}")
    }
}

struct Failure {
    seq: u64,
    err: RunError,
}

/// The set of actors of one run. Spawn them, then [`join`](Topology::join).
pub struct Topology {
    shutdown: Shutdown,
    handles: Vec<(Arc<str>, JoinHandle<()>)>,
    failures: Arc<Mutex<Vec<Failure>>>,
    seq: Arc<std::sync::atomic::AtomicU64>,
}

impl Topology {
    pub fn new(shutdown: Shutdown) -> Self {
        Topology {
            shutdown,
            handles: Vec::new(),
            failures: Arc::new(Mutex::new(Vec::new())),
            seq: Default::default(),
        }
    }

    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Starts actor `name` on its own thread. The closure owns its edges; returning (Ok or Err) drops them, which
    /// closes its outputs (normal end of stream) and makes upstream senders fail fast (the run is unwinding).
    pub fn spawn<F>(&mut self, name: impl Into<String>, body: F)
    where
        F: FnOnce(&ActorContext) -> Result<(), ActorError> + Send + 'static,
    {
        let name: Arc<str> = name.into().into();
        let ctx = ActorContext {
            name: name.clone(),
            shutdown: self.shutdown.clone(),
            input: Arc::new(Mutex::new(String::new())),
        };
        let failures = self.failures.clone();
        let seq = self.seq.clone();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| body(&ctx)));
                let failure = match result {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some((error_chain(&*e), false)),
                    Err(panic) => Some((panic_message(&panic), true)),
                };
                if let Some((message, panicked)) = failure {
                    let err = RunError {
                        actor: ctx.name.to_string(),
                        input: ctx.input(),
                        message,
                        panicked,
                    };
                    tracing::error!("{err}");
                    let n = seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if let Ok(mut f) = failures.lock() {
                        f.push(Failure { seq: n, err });
                    }
                    ctx.shutdown.request(StopReason::Failure);
                }
            })
            .expect("spawning an actor thread");
        self.handles.push((name, handle));
    }

    /// Waits for every actor. Returns the first failure (by time) if any actor failed or panicked.
    pub fn join(self) -> Result<(), RunError> {
        for (_, h) in self.handles {
            let _ = h.join();
        }
        let mut f = std::mem::take(&mut *self.failures.lock().unwrap_or_else(|e| e.into_inner()));
        f.sort_by_key(|f| f.seq);
        // A failure often makes its neighbours fail with "edge closed" errors; the first one is the cause.
        match f.into_iter().next() {
            Some(first) => Err(first.err),
            None => Ok(()),
        }
    }
}

/// The error and its causes on one line; a cause whose text the line already holds is left out (error types that
/// put their `io::Error` in their own message and also expose it as their source would say it twice).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge;
    use std::num::NonZeroUsize;

    /// An error that says its io::Error in its message and also exposes it as its source.
    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct Saying {
        path: String,
        source: std::io::Error,
    }

    #[test]
    fn an_actor_error_says_each_cause_once() {
        let io = || std::io::Error::other("No space left on device (os error 28)");
        let said = error_chain(&Saying {
            path: "/run/ckpt/model.safetensors".into(),
            source: io(),
        });
        assert_eq!(
            said,
            "/run/ckpt/model.safetensors: No space left on device (os error 28)"
        );
        // A cause the message does not hold is kept.
        #[derive(Debug, thiserror::Error)]
        #[error("writing the checkpoint")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(
            error_chain(&Outer(io())),
            "writing the checkpoint: No space left on device (os error 28)"
        );
    }

    #[test]
    fn failure_names_actor_and_input_and_unwinds_the_pipeline() {
        let mut topo = Topology::new(Shutdown::new());
        let (tx, rx) = edge::<u64>("src->bad", NonZeroUsize::new(4).unwrap());
        topo.spawn("src", move |ctx| {
            for i in 0.. {
                if ctx.should_stop() {
                    break;
                }
                if tx.send(i).is_err() {
                    break;
                }
            }
            Ok(())
        });
        topo.spawn("bad", move |ctx| {
            for i in rx.iter() {
                ctx.set_input(format!("item {i}"));
                if i == 10 {
                    return Err("boom".into());
                }
            }
            Ok(())
        });
        let err = topo.join().unwrap_err();
        assert_eq!(err.actor, "bad");
        assert_eq!(err.input, "item 10");
        assert!(err.to_string().contains("boom"), "{err}");
    }

    #[test]
    fn panic_is_caught_and_reported() {
        let mut topo = Topology::new(Shutdown::new());
        topo.spawn("panicky", |ctx| {
            ctx.set_input("file x.xml");
            let v: Vec<u8> = Vec::new();
            let _ = v[3];
            Ok(())
        });
        let err = topo.join().unwrap_err();
        assert!(err.panicked);
        assert!(
            err.to_string().contains("panicky") && err.to_string().contains("x.xml"),
            "{err}"
        );
    }
}
