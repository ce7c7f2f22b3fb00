//! The shard writer: gives each packed sequence its logical shard (`index % shards`), deals it to its rank
//! (`index % world_size`: the global sequence stream is assigned to ranks after the fact, so the stream does not change
//! with the number of GPUs) and optionally tees it into Arrow IPC files. On resume it skips the sequences that the
//! checkpoint says were already consumed. With one process per rank (torchrun-style launch) every process runs the
//! same deterministic stream and keeps only its own rank's sequences.

use lexflow_dataflow::{ActorContext, ActorError, EdgeReceiver, EdgeSender};
use serde::Serialize;

use std::sync::Arc;

use crate::stages::arrow_tee::SharedTee;
use crate::types::PackedSequence;

#[derive(Debug, Clone, Default, Serialize)]
pub struct ShardReport {
    pub sequences_routed: u64,
    pub sequences_skipped_on_resume: u64,
    /// One process per rank: sequences of the other processes' ranks (not sent here).
    pub sequences_other_processes: u64,
    pub per_rank: Vec<u64>,
    pub per_shard: Vec<u64>,
    /// `shards.arrow_dir`: what this run's part of the tee holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arrow_tee: Option<crate::stages::arrow_tee::TeeSummary>,
}

pub struct ShardWriter {
    pub shards: usize,
    /// Global sequences already consumed by a previous run (resume).
    pub skip: u64,
    /// Stop after this many global sequences (counting skipped ones).
    pub limit: Option<u64>,
    /// Shared with trainer rank 0, which makes it durable before each checkpoint.
    pub tee: Option<Arc<SharedTee>>,
    /// One process per rank: `(this process's rank, world size)`; the writer then has one rank edge and sends it
    /// the sequences with `index % world == rank`.
    pub process: Option<(usize, usize)>,
}

pub fn run_shard_writer(
    ctx: &ActorContext,
    w: ShardWriter,
    input: EdgeReceiver<PackedSequence>,
    ranks: Vec<EdgeSender<PackedSequence>>,
    report: &std::sync::Mutex<ShardReport>,
) -> Result<(), ActorError> {
    let tee = w.tee.clone();
    let r = route(ctx, w, input, ranks, report);
    // However the writer ended, a checkpoint waiting for the tee must not wait for more sequences.
    if let Some(t) = tee {
        t.close();
    }
    r
}

fn route(
    ctx: &ActorContext,
    mut w: ShardWriter,
    input: EdgeReceiver<PackedSequence>,
    ranks: Vec<EdgeSender<PackedSequence>>,
    report: &std::sync::Mutex<ShardReport>,
) -> Result<(), ActorError> {
    let world = w.process.map_or(ranks.len(), |(_, world)| world);
    if let Some((rank, world)) = w.process {
        if ranks.len() != 1 || rank >= world {
            return Err(format!(
                "one process per rank: rank {rank} of {world} needs exactly one rank edge, got {}",
                ranks.len()
            )
            .into());
        }
    }
    let mut rep = ShardReport {
        per_rank: vec![0; ranks.len()],
        per_shard: vec![0; w.shards],
        ..Default::default()
    };
    let m = lexflow_metrics::global();
    let global_rank = |local: usize| w.process.map_or(local, |(r, _)| r);
    let rank_counters: Vec<_> = (0..ranks.len())
        .map(|r| {
            m.shard_sequences
                .with_label_values(&[&global_rank(r).to_string()])
        })
        .collect();
    let mut alive = vec![true; ranks.len()];
    let lat = lexflow_metrics::latency("shard_writer");
    let am = lexflow_metrics::actor("shard_writer");
    for mut seq in input.iter() {
        let t = std::time::Instant::now();
        am.items_in.inc();
        if w.limit.is_some_and(|l| seq.index >= l) {
            break;
        }
        ctx.set_input(format!("sequence {}", seq.index));
        seq.shard = (seq.index % w.shards as u64) as u32;
        if seq.index < w.skip {
            rep.sequences_skipped_on_resume += 1;
            continue;
        }
        if let Some(tee) = &w.tee {
            tee.write(&seq)?;
        }
        let rank = match w.process {
            None => (seq.index % world as u64) as usize,
            Some((me, _)) if (seq.index % world as u64) as usize == me => 0,
            Some(_) => {
                rep.sequences_other_processes += 1;
                continue;
            }
        };
        // Work ends here; the send below may block on a busy rank (backpressure, measured on the edge).
        lat.record(t.elapsed());
        am.busy_seconds.inc_by(t.elapsed().as_secs_f64());
        rep.per_shard[seq.shard as usize] += 1;
        if alive[rank] {
            if ranks[rank].send(seq).is_err() {
                // That rank finished its steps; the others finish theirs at the same global step.
                alive[rank] = false;
            } else {
                am.items_out.inc();
                rep.per_rank[rank] += 1;
                rep.sequences_routed += 1;
                rank_counters[rank].inc();
            }
        }
        if !alive.iter().any(|a| *a) {
            break;
        }
        if rep.sequences_routed.is_multiple_of(64) {
            if let Ok(mut g) = report.lock() {
                *g = rep.clone();
            }
        }
    }
    if let Some(tee) = w.tee.take() {
        rep.arrow_tee = tee.finish()?;
    }
    if let Ok(mut g) = report.lock() {
        *g = rep;
    }
    Ok(())
}
