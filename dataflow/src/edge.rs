use std::num::NonZeroUsize;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use lexflow_metrics::EdgeMetrics;

/// The receiving side is gone: the downstream actor stopped (failed or finished early).
#[derive(Debug, thiserror::Error)]
#[error("edge {edge}: the receiving actor has stopped")]
pub struct SendError {
    pub edge: String,
}

/// All senders are gone and the edge is empty: the normal end of a stream.
#[derive(Debug, thiserror::Error)]
#[error("edge {edge}: closed")]
pub struct RecvError {
    pub edge: String,
}

/// Sending half of a bounded blocking edge. Cloning adds a sender; the edge closes when all are dropped.
pub struct EdgeSender<T> {
    tx: Sender<T>,
    name: std::sync::Arc<str>,
    m: EdgeMetrics,
}

impl<T> Clone for EdgeSender<T> {
    fn clone(&self) -> Self {
        EdgeSender {
            tx: self.tx.clone(),
            name: self.name.clone(),
            m: self.m.clone(),
        }
    }
}

/// Receiving half of a bounded blocking edge.
pub struct EdgeReceiver<T> {
    rx: Receiver<T>,
    name: std::sync::Arc<str>,
    m: EdgeMetrics,
}

/// A bounded, blocking edge named `name` (the metric label, e.g. `packer->shard_writer`).
pub fn edge<T>(name: &str, capacity: NonZeroUsize) -> (EdgeSender<T>, EdgeReceiver<T>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity.get());
    let m = lexflow_metrics::edge(name);
    m.capacity.set(capacity.get() as i64);
    let name: std::sync::Arc<str> = name.into();
    (
        EdgeSender {
            tx,
            name: name.clone(),
            m: m.clone(),
        },
        EdgeReceiver { rx, name, m },
    )
}

impl<T> EdgeSender<T> {
    /// Sends, blocking while the edge is full. Time spent blocked is counted as backpressure.
    pub fn send(&self, item: T) -> Result<(), SendError> {
        let item = match self.tx.try_send(item) {
            Ok(()) => {
                self.sent();
                return Ok(());
            }
            Err(TrySendError::Disconnected(_)) => return Err(self.err()),
            Err(TrySendError::Full(item)) => item,
        };
        let t0 = Instant::now();
        let r = self.tx.send(item);
        self.m.blocked_seconds.inc_by(t0.elapsed().as_secs_f64());
        match r {
            Ok(()) => {
                self.sent();
                Ok(())
            }
            Err(_) => Err(self.err()),
        }
    }

    fn sent(&self) {
        self.m.sent.inc();
        self.m.depth.set(self.tx.len() as i64);
    }

    fn err(&self) -> SendError {
        SendError {
            edge: self.name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Messages queued right now.
    pub fn len(&self) -> usize {
        self.tx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tx.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.tx.capacity().unwrap_or(0)
    }
}

impl<T> EdgeReceiver<T> {
    /// Receives, blocking while the edge is empty. Time spent waiting is counted as starvation.
    pub fn recv(&self) -> Result<T, RecvError> {
        let r = match self.rx.try_recv() {
            Ok(v) => Ok(v),
            Err(crossbeam_channel::TryRecvError::Disconnected) => Err(()),
            Err(crossbeam_channel::TryRecvError::Empty) => {
                let t0 = Instant::now();
                let r = self.rx.recv().map_err(|_| ());
                self.m.starved_seconds.inc_by(t0.elapsed().as_secs_f64());
                r
            }
        };
        self.m.depth.set(self.rx.len() as i64);
        r.map_err(|()| RecvError {
            edge: self.name.to_string(),
        })
    }

    /// Like [`recv`](Self::recv) but also returns the time spent waiting (for per-rank data-wait accounting).
    pub fn recv_timed(&self) -> (Result<T, RecvError>, std::time::Duration) {
        let t0 = Instant::now();
        let r = self.recv();
        (r, t0.elapsed())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = T> + '_ {
        std::iter::from_fn(move || self.recv().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    #[test]
    fn full_edge_blocks_sender_until_receiver_takes() {
        let (tx, rx) = edge::<u32>("test->blocks", cap(2));
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        let h = std::thread::spawn(move || {
            let t0 = Instant::now();
            tx.send(3).unwrap();
            t0.elapsed()
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(rx.len(), 2, "third item must not be queued while full");
        assert_eq!(rx.recv().unwrap(), 1);
        let blocked = h.join().unwrap();
        assert!(
            blocked >= std::time::Duration::from_millis(90),
            "sender was not blocked: {blocked:?}"
        );
        assert_eq!(rx.recv().unwrap(), 2);
        assert_eq!(rx.recv().unwrap(), 3);
        assert!(rx.recv().is_err(), "edge closes once the sender is dropped");
    }

    #[test]
    fn send_to_stopped_receiver_is_an_error_not_a_drop() {
        let (tx, rx) = edge::<u32>("test->stopped", cap(1));
        drop(rx);
        let e = tx.send(7).unwrap_err();
        assert!(e.to_string().contains("test->stopped"));
    }
}
