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

/// The value of one series (`name{labels}`) in a Prometheus text scrape.
fn scraped(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Backpressure and starvation are counted while they happen: a scrape during a long block sees
/// `lexflow_edge_blocked_seconds_total` / `lexflow_edge_starved_seconds_total` grow at about 1 s/s, not stay flat
/// until the blocked call returns (which made the Grafana panels read 0 during a run and spike at its end).
#[test]
fn blocked_and_starved_seconds_grow_in_a_scrape_during_a_long_block() {
    let nz = |n: usize| NonZeroUsize::new(n).unwrap();
    let (tx, rx) = edge::<u64>("bp.live.source->sink", nz(1));
    let (go_tx, go_rx) = edge::<()>("bp.live.control->sink", nz(1));
    let source = std::thread::spawn(move || {
        for i in 0..3 {
            tx.send(i).unwrap(); // 0 fills the edge, 1 blocks until the sink drains
        }
    });
    // The sink waits (starved) on the control edge before it drains the data edge.
    let sink = std::thread::spawn(move || {
        go_rx.recv().unwrap();
        rx.iter().collect::<Vec<_>>()
    });
    let blocked = r#"lexflow_edge_blocked_seconds_total{edge="bp.live.source->sink"}"#;
    let starved = r#"lexflow_edge_starved_seconds_total{edge="bp.live.control->sink"}"#;
    let scrape = || {
        let text = lexflow_metrics::global().encode();
        (
            scraped(&text, blocked).unwrap_or(0.0),
            scraped(&text, starved).unwrap_or(0.0),
        )
    };

    std::thread::sleep(Duration::from_millis(1000));
    let (b1, s1) = scrape();
    std::thread::sleep(Duration::from_millis(500));
    let (b2, s2) = scrape();
    assert!(
        !source.is_finished() && !sink.is_finished(),
        "both should still be waiting"
    );
    assert!(b1 >= 0.5, "blocked for ~1 s, the scrape reads {b1} s");
    assert!(s1 >= 0.5, "starved for ~1 s, the scrape reads {s1} s");
    // Between two scrapes 0.5 s apart the counters advance at ~1 s/s (WAIT_SLICE granularity: 0.1 s).
    assert!(b2 - b1 >= 0.3, "blocked counter went {b1} -> {b2} in 0.5 s");
    assert!(s2 - s1 >= 0.3, "starved counter went {s1} -> {s2} in 0.5 s");

    go_tx.send(()).unwrap();
    drop(go_tx);
    source.join().unwrap();
    assert_eq!(
        sink.join().unwrap(),
        vec![0, 1, 2],
        "nothing lost or reordered"
    );
    let (b3, s3) = scrape();
    assert!(b3 >= b2 && b3 < 5.0, "blocked total {b3} s");
    assert!(s3 >= s2 && s3 < 5.0, "starved total {s3} s");
}
