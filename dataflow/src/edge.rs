use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use crossbeam_channel::{
    Receiver, RecvTimeoutError, SendTimeoutError, Sender, TryRecvError, TrySendError,
};
use lexflow_metrics::EdgeMetrics;

/// A blocked send or an empty-edge receive waits in slices of this length and adds each slice's time to the
/// blocked/starved counter as it goes, so a scrape during a long block sees the counter grow at ~1 s/s instead of one
/// jump when the call returns.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Seconds since `*mark`, moving `mark` to now (so consecutive slices are counted once each).
fn lap(mark: &mut Instant) -> f64 {
    let now = Instant::now();
    let secs = now.duration_since(*mark).as_secs_f64();
    *mark = now;
    secs
}

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
    /// Sends, blocking while the edge is full. Time spent blocked is counted as backpressure while it accrues
    /// (every 0.1 s), so a scrape during a long block sees it.
    pub fn send(&self, item: T) -> Result<(), SendError> {
        let item = match self.tx.try_send(item) {
            Ok(()) => {
                self.sent();
                return Ok(());
            }
            Err(TrySendError::Disconnected(_)) => return Err(self.err()),
            Err(TrySendError::Full(item)) => item,
        };
        // Slow path: the edge is full. Block in slices, counting blocked time while it happens.
        let mut item = item;
        let mut mark = Instant::now();
        let r = loop {
            match self.tx.send_timeout(item, WAIT_SLICE) {
                Ok(()) => break Ok(()),
                Err(SendTimeoutError::Disconnected(_)) => break Err(()),
                Err(SendTimeoutError::Timeout(back)) => {
                    self.m.blocked_seconds.inc_by(lap(&mut mark));
                    item = back;
                }
            }
        };
        self.m.blocked_seconds.inc_by(lap(&mut mark));
        match r {
            Ok(()) => {
                self.sent();
                Ok(())
            }
            Err(()) => Err(self.err()),
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
    /// Receives, blocking while the edge is empty. Time spent waiting is counted as starvation while it accrues
    /// (every 0.1 s).
    pub fn recv(&self) -> Result<T, RecvError> {
        let r = match self.rx.try_recv() {
            Ok(v) => Ok(v),
            Err(TryRecvError::Disconnected) => Err(()),
            Err(TryRecvError::Empty) => {
                // Slow path: the edge is empty. Wait in slices, counting starved time while it happens.
                let mut mark = Instant::now();
                let r = loop {
                    match self.rx.recv_timeout(WAIT_SLICE) {
                        Ok(v) => break Ok(v),
                        Err(RecvTimeoutError::Disconnected) => break Err(()),
                        Err(RecvTimeoutError::Timeout) => {
                            self.m.starved_seconds.inc_by(lap(&mut mark))
                        }
                    }
                };
                self.m.starved_seconds.inc_by(lap(&mut mark));
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

    /// Blocked time must be visible to a scrape while the sender is still blocked, not only once `send` returns.
    #[test]
    fn blocked_time_is_counted_while_the_sender_is_still_blocked() {
        let name = "test->blocked_live";
        let (tx, rx) = edge::<u32>(name, cap(1));
        tx.send(1).unwrap();
        let h = std::thread::spawn(move || {
            let t0 = Instant::now();
            tx.send(2).unwrap();
            t0.elapsed()
        });
        std::thread::sleep(Duration::from_millis(1000));
        // What a scrape from another thread sees: the same series, looked up by name.
        let live = lexflow_metrics::edge(name).blocked_seconds.get();
        assert!(!h.is_finished(), "the sender should still be blocked");
        assert_eq!(rx.len(), 1, "the blocked item must not be queued");
        assert!(
            live >= 0.5,
            "after ~1 s blocked the counter reads {live} s while the send is in progress"
        );
        assert_eq!(rx.recv().unwrap(), 1);
        let blocked = h.join().unwrap().as_secs_f64();
        let total = lexflow_metrics::edge(name).blocked_seconds.get();
        assert!(
            total >= live && total <= blocked + 0.01,
            "counted {total} s for a send blocked {blocked} s (live {live} s)"
        );
        assert_eq!(rx.recv().unwrap(), 2);
        assert!(rx.recv().is_err());
    }

    /// Starved time must be visible while the receiver is still waiting on the empty edge.
    #[test]
    fn starved_time_is_counted_while_the_receiver_is_still_waiting() {
        let name = "test->starved_live";
        let (tx, rx) = edge::<u32>(name, cap(1));
        let h = std::thread::spawn(move || {
            let t0 = Instant::now();
            let v = rx.recv().unwrap();
            (v, t0.elapsed(), rx)
        });
        std::thread::sleep(Duration::from_millis(1000));
        let live = lexflow_metrics::edge(name).starved_seconds.get();
        assert!(!h.is_finished(), "the receiver should still be waiting");
        assert!(
            live >= 0.5,
            "after ~1 s starved the counter reads {live} s while the recv is in progress"
        );
        tx.send(9).unwrap();
        let (v, waited, rx) = h.join().unwrap();
        assert_eq!(v, 9);
        let total = lexflow_metrics::edge(name).starved_seconds.get();
        let waited = waited.as_secs_f64();
        assert!(
            total >= live && total <= waited + 0.01,
            "counted {total} s for a recv that waited {waited} s (live {live} s)"
        );
        drop(tx);
        assert!(rx.recv().is_err(), "edge closes once the sender is dropped");
    }

    /// Waiting in slices keeps disconnect handling: a blocked send fails when the receiver goes, a waiting recv ends
    /// when the last sender goes, and items queued before the senders left are still delivered.
    #[test]
    fn disconnect_ends_a_blocked_send_or_recv() {
        let (tx, rx) = edge::<u32>("test->disconnect_blocked", cap(1));
        tx.send(1).unwrap();
        let h = std::thread::spawn(move || tx.send(2));
        std::thread::sleep(Duration::from_millis(250));
        drop(rx);
        let e = h.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("test->disconnect_blocked"));

        let (tx, rx) = edge::<u32>("test->disconnect_starved", cap(2));
        let h = std::thread::spawn(move || {
            let first = rx.recv().map_err(|e| e.to_string());
            let rest: Vec<u32> = rx.iter().collect();
            (first, rest, rx.recv().map_err(|e| e.to_string()))
        });
        std::thread::sleep(Duration::from_millis(250));
        let tx2 = tx.clone();
        tx.send(5).unwrap();
        tx2.send(6).unwrap();
        drop(tx);
        std::thread::sleep(Duration::from_millis(250));
        drop(tx2);
        let (first, rest, last) = h.join().unwrap();
        assert_eq!(first, Ok(5));
        assert_eq!(rest, vec![6]);
        assert_eq!(
            last,
            Err("edge test->disconnect_starved: closed".to_string())
        );
    }

    #[test]
    fn send_to_stopped_receiver_is_an_error_not_a_drop() {
        let (tx, rx) = edge::<u32>("test->stopped", cap(1));
        drop(rx);
        let e = tx.send(7).unwrap_err();
        assert!(e.to_string().contains("test->stopped"));
    }
}
