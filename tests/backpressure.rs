//! Backpressure: with a stalled sink, the items in flight never exceed the sum of edge capacities (plus the one message
//! each actor may hold), and nothing is lost or reordered when the sink resumes.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use lexflow_dataflow::{edge, ordered_pool, Shutdown, Topology};

#[test]
fn stalled_sink_bounds_items_in_flight_and_loses_nothing() {
    let caps = [3usize, 2, 4, 1];
    let nz = |n: usize| NonZeroUsize::new(n).unwrap();
    let produced = Arc::new(AtomicU64::new(0));
    let consumed = Arc::new(AtomicU64::new(0));
    let stalled = Arc::new(AtomicBool::new(true));
    let total = 500u64;

    let mut topo = Topology::new(Shutdown::new());
    let (tx0, rx0) = edge::<u64>("bp.source->pool", nz(caps[0]));
    let (tx1, rx1) = edge::<u64>("bp.pool->stage", nz(caps[1]));
    let (tx2, rx2) = edge::<u64>("bp.stage->sink", nz(caps[2]));
    let p = produced.clone();
    topo.spawn("bp.source", move |_| {
        for i in 0..total {
            tx0.send(i)?;
            p.fetch_add(1, SeqCst);
        }
        Ok(())
    });
    // A two-worker ordered pool in the middle: its internal edges have capacity caps[3] each.
    ordered_pool(&mut topo, "bp.pool", nz(2), nz(caps[3]), rx0, tx1, |_| {
        |_ctx: &lexflow_dataflow::ActorContext, x: u64| Ok(x)
    });
    topo.spawn("bp.stage", move |_| {
        for x in rx1.iter() {
            tx2.send(x)?;
        }
        Ok(())
    });
    let c = consumed.clone();
    let st = stalled.clone();
    let sink = std::thread::spawn(move || {
        let mut got = Vec::new();
        while st.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        for x in rx2.iter() {
            got.push(x);
            c.fetch_add(1, SeqCst);
        }
        got
    });

    std::thread::sleep(Duration::from_millis(500));
    let in_flight = produced.load(SeqCst) - consumed.load(SeqCst);
    // Edges: source->pool, pool internals (2 workers × (in + out)), pool->stage, stage->sink.
    let edge_sum = caps[0] + 2 * 2 * caps[3] + caps[1] + caps[2];
    // Each of the actors (dispatch, 2 workers, collect, stage) may hold one message between recv and send,
    // and the source counts an item as produced only after its send returned.
    let holders = 5;
    assert!(in_flight > 0, "the source should have filled the edges");
    assert!(
        in_flight as usize <= edge_sum + holders,
        "{in_flight} items in flight exceed the edge capacities {edge_sum} + {holders} held"
    );
    // The source is blocked, not finished.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        produced.load(SeqCst) - consumed.load(SeqCst),
        in_flight,
        "source kept producing while stalled"
    );

    stalled.store(false, SeqCst);
    topo.join().unwrap();
    let got = sink.join().unwrap();
    assert_eq!(
        got,
        (0..total).collect::<Vec<_>>(),
        "every item arrives once, in order"
    );
}
