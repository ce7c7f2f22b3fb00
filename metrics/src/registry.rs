use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hdrhistogram::Histogram as Hdr;
use prometheus::{
    exponential_buckets, Counter, CounterVec, Gauge, GaugeVec, Histogram, HistogramOpts,
    HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::names::*;

/// All lexflow metric families, registered once in one [`Registry`].
pub struct Metrics {
    pub registry: Registry,
    pub build_info: GaugeVec,
    pub run_info: GaugeVec,
    pub start_time_seconds: Gauge,
    pub actor_items_in: IntCounterVec,
    pub actor_items_out: IntCounterVec,
    pub actor_bytes_in: IntCounterVec,
    pub actor_bytes_out: IntCounterVec,
    pub actor_errors: IntCounterVec,
    pub actor_busy_seconds: CounterVec,
    pub edge_depth: IntGaugeVec,
    pub edge_capacity: IntGaugeVec,
    pub edge_sent: IntCounterVec,
    pub edge_blocked_seconds: CounterVec,
    pub edge_starved_seconds: CounterVec,
    pub stage_latency: HistogramVec,
    pub stage_latency_quantile: GaugeVec,
    pub reader_files: IntCounterVec,
    pub reader_documents: IntCounterVec,
    pub reader_quarantined: IntCounter,
    pub dedup_documents: IntCounterVec,
    pub dedup_dropped_bytes: IntCounterVec,
    pub filter_documents: IntCounterVec,
    pub filter_dropped_bytes: IntCounterVec,
    pub tokenizer_tokens: IntCounterVec,
    pub sampler_tokens: IntCounterVec,
    pub sampler_target_share: GaugeVec,
    pub sampler_realized_share: GaugeVec,
    pub packer_sequences: IntCounter,
    pub packer_padding_tokens: IntCounter,
    pub packer_truncated_tokens: IntCounter,
    pub packer_truncated_documents: IntCounter,
    pub packer_fill_efficiency: Gauge,
    pub shard_sequences: IntCounterVec,
    pub trainer_steps: IntCounterVec,
    pub trainer_tokens: IntCounterVec,
    pub trainer_tokens_per_second: GaugeVec,
    pub trainer_step_seconds: HistogramVec,
    pub trainer_data_wait_seconds: CounterVec,
    pub trainer_data_wait_fraction: GaugeVec,
    pub trainer_loss: GaugeVec,
    pub trainer_lr: GaugeVec,
    pub trainer_grad_norm: GaugeVec,
    pub trainer_mfu: GaugeVec,
    pub trainer_device_memory: IntGaugeVec,
    pub checkpoint_duration: HistogramVec,
    pub checkpoint_size: IntGaugeVec,
    pub checkpoint_last_success: GaugeVec,
    pub checkpoints: IntCounterVec,
    pub eval_loss: GaugeVec,
    pub eval_tokens: IntGaugeVec,
    pub eval_step: IntGauge,
    pub eval_seconds: Histogram,
    pub eval_qa: GaugeVec,
    latencies: Mutex<Vec<(String, LatencyRecorder)>>,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let icv = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let cv = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                CounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gv = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let igv = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let hv = |name: &str, help: &str, labels: &[&str], start: f64| {
            let opts = HistogramOpts::new(name, help)
                .buckets(exponential_buckets(start, 2.0, 24).expect("valid buckets"));
            reg(&r, HistogramVec::new(opts, labels).expect("valid metric"))
        };
        let ic = |name: &str, help: &str| reg(&r, IntCounter::new(name, help).expect("valid"));
        let build_info = gv(
            BUILD_INFO,
            "Constant 1; the version label names the lexflow build",
            &[LABEL_VERSION],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        let start_time_seconds = reg(
            &r,
            Gauge::new(
                START_TIME_SECONDS,
                "Unix time the process registered its metrics",
            )
            .expect("valid"),
        );
        start_time_seconds.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        Metrics {
            build_info,
            run_info: gv(
                RUN_INFO,
                "Constant 1; the run label names the run ([run] name)",
                &[LABEL_RUN],
            ),
            start_time_seconds,
            actor_items_in: icv(
                ACTOR_ITEMS_IN_TOTAL,
                "Items received by an actor",
                &[LABEL_ACTOR],
            ),
            actor_items_out: icv(
                ACTOR_ITEMS_OUT_TOTAL,
                "Items emitted by an actor",
                &[LABEL_ACTOR],
            ),
            actor_bytes_in: icv(
                ACTOR_BYTES_IN_TOTAL,
                "Bytes received by an actor",
                &[LABEL_ACTOR],
            ),
            actor_bytes_out: icv(
                ACTOR_BYTES_OUT_TOTAL,
                "Bytes emitted by an actor",
                &[LABEL_ACTOR],
            ),
            actor_errors: icv(
                ACTOR_ERRORS_TOTAL,
                "Errors by actor and kind",
                &[LABEL_ACTOR, LABEL_KIND],
            ),
            actor_busy_seconds: cv(
                ACTOR_BUSY_SECONDS_TOTAL,
                "Time an actor spent processing",
                &[LABEL_ACTOR],
            ),
            edge_depth: igv(
                EDGE_QUEUE_DEPTH,
                "Messages queued on an edge",
                &[LABEL_EDGE],
            ),
            edge_capacity: igv(
                EDGE_CAPACITY,
                "Capacity of an edge in messages",
                &[LABEL_EDGE],
            ),
            edge_sent: icv(EDGE_SENT_TOTAL, "Messages sent over an edge", &[LABEL_EDGE]),
            edge_blocked_seconds: cv(
                EDGE_BLOCKED_SECONDS_TOTAL,
                "Time senders spent blocked on a full edge (backpressure)",
                &[LABEL_EDGE],
            ),
            edge_starved_seconds: cv(
                EDGE_STARVED_SECONDS_TOTAL,
                "Time receivers spent waiting on an empty edge (starvation)",
                &[LABEL_EDGE],
            ),
            stage_latency: hv(
                STAGE_LATENCY_SECONDS,
                "Time to process one message in a stage",
                &[LABEL_STAGE],
                1e-6,
            ),
            stage_latency_quantile: gv(
                STAGE_LATENCY_QUANTILE_SECONDS,
                "Exact in-process latency quantiles (hdrhistogram)",
                &[LABEL_STAGE, LABEL_QUANTILE],
            ),
            reader_files: icv(READER_FILES_TOTAL, "Input files read", &[LABEL_LANG]),
            reader_documents: icv(READER_DOCUMENTS_TOTAL, "Documents parsed", &[LABEL_LANG]),
            reader_quarantined: ic(
                READER_QUARANTINED_FILES_TOTAL,
                "Input files quarantined as bad",
            ),
            dedup_documents: icv(
                DEDUP_DOCUMENTS_TOTAL,
                "Documents through deduplication, by result (kept, exact, near, heldout)",
                &[LABEL_LANG, LABEL_RESULT],
            ),
            dedup_dropped_bytes: icv(
                DEDUP_DROPPED_BYTES_TOTAL,
                "Text bytes of documents dropped as repeats",
                &[LABEL_LANG],
            ),
            filter_documents: icv(
                FILTER_DOCUMENTS_TOTAL,
                "Documents through the quality filter, by result (kept, or the reason of a drop: recency, type, \
                 length, subject)",
                &[LABEL_LANG, LABEL_RESULT],
            ),
            filter_dropped_bytes: icv(
                FILTER_DROPPED_BYTES_TOTAL,
                "Text bytes of documents dropped by the quality filter",
                &[LABEL_LANG],
            ),
            tokenizer_tokens: icv(
                TOKENIZER_TOKENS_TOTAL,
                "Tokens produced by the tokenizers",
                &[LABEL_LANG],
            ),
            sampler_tokens: icv(
                SAMPLER_TOKENS_TOTAL,
                "Tokens emitted by the language sampler",
                &[LABEL_LANG],
            ),
            sampler_target_share: gv(
                SAMPLER_TARGET_SHARE,
                "Target token share of a language",
                &[LABEL_LANG],
            ),
            sampler_realized_share: gv(
                SAMPLER_REALIZED_SHARE,
                "Realized token share of a language",
                &[LABEL_LANG],
            ),
            packer_sequences: ic(PACKER_SEQUENCES_TOTAL, "Packed sequences emitted"),
            packer_padding_tokens: ic(
                PACKER_PADDING_TOKENS_TOTAL,
                "Padding tokens in packed sequences",
            ),
            packer_truncated_tokens: ic(
                PACKER_TRUNCATED_TOKENS_TOTAL,
                "Document tokens dropped by truncation",
            ),
            packer_truncated_documents: ic(
                PACKER_TRUNCATED_DOCUMENTS_TOTAL,
                "Documents split or truncated by the packer",
            ),
            packer_fill_efficiency: reg(
                &r,
                Gauge::new(
                    PACKER_FILL_EFFICIENCY,
                    "Share of non-padding tokens in packed sequences",
                )
                .expect("valid"),
            ),
            shard_sequences: icv(
                SHARD_SEQUENCES_TOTAL,
                "Sequences routed to a rank",
                &[LABEL_RANK],
            ),
            trainer_steps: icv(TRAINER_STEPS_TOTAL, "Optimizer steps", &[LABEL_RANK]),
            trainer_tokens: icv(TRAINER_TOKENS_TOTAL, "Tokens trained on", &[LABEL_RANK]),
            trainer_tokens_per_second: gv(
                TRAINER_TOKENS_PER_SECOND,
                "Training throughput",
                &[LABEL_RANK],
            ),
            trainer_step_seconds: hv(
                TRAINER_STEP_SECONDS,
                "Wall time of one optimizer step",
                &[LABEL_RANK],
                1e-3,
            ),
            trainer_data_wait_seconds: cv(
                TRAINER_DATA_WAIT_SECONDS_TOTAL,
                "Time a trainer waited for data",
                &[LABEL_RANK],
            ),
            trainer_data_wait_fraction: gv(
                TRAINER_DATA_WAIT_FRACTION,
                "Share of step time spent waiting for data",
                &[LABEL_RANK],
            ),
            trainer_loss: gv(
                TRAINER_LOSS,
                "Training loss of the last step",
                &[LABEL_RANK],
            ),
            trainer_lr: gv(
                TRAINER_LEARNING_RATE,
                "Learning rate of the last step",
                &[LABEL_RANK],
            ),
            trainer_grad_norm: gv(
                TRAINER_GRAD_NORM,
                "Global gradient norm before clipping",
                &[LABEL_RANK],
            ),
            trainer_mfu: gv(
                TRAINER_MFU_RATIO,
                "Model FLOPs utilisation estimate",
                &[LABEL_RANK],
            ),
            trainer_device_memory: igv(
                TRAINER_DEVICE_MEMORY_BYTES,
                "Device memory in use",
                &[LABEL_RANK],
            ),
            checkpoint_duration: hv(
                CHECKPOINT_DURATION_SECONDS,
                "Time to write a checkpoint",
                &[LABEL_RANK],
                1e-3,
            ),
            checkpoint_size: igv(
                CHECKPOINT_SIZE_BYTES,
                "Size of the last checkpoint",
                &[LABEL_RANK],
            ),
            checkpoint_last_success: gv(
                CHECKPOINT_LAST_SUCCESS_TIMESTAMP_SECONDS,
                "Unix time of the last successful checkpoint",
                &[LABEL_RANK],
            ),
            checkpoints: icv(CHECKPOINTS_TOTAL, "Checkpoints written", &[LABEL_RANK]),
            eval_loss: gv(
                EVAL_LOSS,
                "Held-out loss (mean cross-entropy per target token) at the last evaluation; lang=\"all\": every language, token-weighted",
                &[LABEL_LANG],
            ),
            eval_tokens: igv(
                EVAL_TOKENS,
                "Target tokens of the held-out set",
                &[LABEL_LANG],
            ),
            eval_step: reg(
                &r,
                IntGauge::new(EVAL_STEP, "Optimizer step of the last held-out evaluation")
                    .expect("valid"),
            ),
            eval_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(EVAL_SECONDS, "Time of one held-out evaluation (all ranks)")
                        .buckets(exponential_buckets(1e-3, 2.0, 24).expect("valid buckets")),
                )
                .expect("valid"),
            ),
            eval_qa: gv(
                EVAL_QA,
                "Q&A score at the last evaluation (metric: exact_match, rouge_l, citation_accuracy, hallucination_rate, wrong_citation_rate; lang=\"all\": every language)",
                &[LABEL_METRIC, LABEL_LANG],
            ),
            latencies: Mutex::new(Vec::new()),
            registry: r,
        }
    }

    /// Text exposition of every family, with hdrhistogram quantiles refreshed first.
    pub fn encode(&self) -> String {
        self.refresh_quantiles();
        let mut buf = String::new();
        let enc = prometheus::TextEncoder::new();
        enc.encode_utf8(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics cannot fail");
        buf
    }

    fn refresh_quantiles(&self) {
        let lat = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        for (stage, rec) in lat.iter() {
            let h = rec.inner.lock().unwrap_or_else(|e| e.into_inner());
            if h.is_empty() {
                continue;
            }
            for (q, label) in [(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99"), (1.0, "1")] {
                let v = h.value_at_quantile(q) as f64 * 1e-9;
                self.stage_latency_quantile
                    .with_label_values(&[stage, label])
                    .set(v);
            }
        }
    }
}

/// Names the run in `lexflow_run_info{run="…"} 1`; a later call replaces the earlier label (one run per process).
pub fn set_run_labels(run: &str) {
    let m = global();
    m.run_info.reset();
    m.run_info.with_label_values(&[run]).set(1.0);
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

/// Generic per-actor counters.
#[derive(Clone)]
pub struct ActorMetrics {
    pub items_in: IntCounter,
    pub items_out: IntCounter,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub busy_seconds: Counter,
    name: String,
}

impl ActorMetrics {
    pub fn error(&self, kind: &str) {
        global()
            .actor_errors
            .with_label_values(&[&self.name, kind])
            .inc();
    }
}

pub fn actor(name: &str) -> ActorMetrics {
    let m = global();
    ActorMetrics {
        items_in: m.actor_items_in.with_label_values(&[name]),
        items_out: m.actor_items_out.with_label_values(&[name]),
        bytes_in: m.actor_bytes_in.with_label_values(&[name]),
        bytes_out: m.actor_bytes_out.with_label_values(&[name]),
        busy_seconds: m.actor_busy_seconds.with_label_values(&[name]),
        name: name.to_string(),
    }
}

/// Per-edge gauges and counters.
#[derive(Clone)]
pub struct EdgeMetrics {
    pub depth: IntGauge,
    pub capacity: IntGauge,
    pub sent: IntCounter,
    pub blocked_seconds: Counter,
    pub starved_seconds: Counter,
}

pub fn edge(name: &str) -> EdgeMetrics {
    let m = global();
    EdgeMetrics {
        depth: m.edge_depth.with_label_values(&[name]),
        capacity: m.edge_capacity.with_label_values(&[name]),
        sent: m.edge_sent.with_label_values(&[name]),
        blocked_seconds: m.edge_blocked_seconds.with_label_values(&[name]),
        starved_seconds: m.edge_starved_seconds.with_label_values(&[name]),
    }
}

/// Latency of one stage: exact quantiles in an hdrhistogram plus a Prometheus histogram.
#[derive(Clone)]
pub struct LatencyRecorder {
    inner: Arc<Mutex<Hdr<u64>>>,
    prom: prometheus::Histogram,
}

impl LatencyRecorder {
    pub fn record(&self, d: Duration) {
        let ns = (d.as_nanos() as u64).max(1);
        if let Ok(mut h) = self.inner.lock() {
            h.saturating_record(ns);
        }
        self.prom.observe(d.as_secs_f64());
    }

    /// Exact quantile in seconds (None while empty).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let h = self.inner.lock().ok()?;
        (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 * 1e-9)
    }
}

/// The latency recorder of a stage (created on first use, shared afterwards).
pub fn latency(stage: &str) -> LatencyRecorder {
    let m = global();
    let mut lat = m.latencies.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, r)) = lat.iter().find(|(s, _)| s == stage) {
        return r.clone();
    }
    let rec = LatencyRecorder {
        inner: Arc::new(Mutex::new(
            Hdr::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid hdrhistogram bounds"),
        )),
        prom: m.stage_latency.with_label_values(&[stage]),
    };
    lat.push((stage.to_string(), rec.clone()));
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the first sample line of `series` (name plus rendered labels) in a text exposition.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn encode_contains_every_family_once_touched() {
        let a = actor("test_encode_actor");
        a.items_out.inc();
        a.error("test_kind");
        edge("test_encode_edge").blocked_seconds.inc_by(0.5);
        latency("test_encode_stage").record(Duration::from_millis(3));
        let m = global();
        // set_run_labels is checked here and nowhere else: tests run concurrently on the one global registry.
        set_run_labels("first-run");
        set_run_labels("test-run");
        m.reader_files.with_label_values(&["en"]).inc();
        m.reader_documents.with_label_values(&["en"]).inc();
        m.dedup_documents.with_label_values(&["en", "kept"]).inc();
        m.dedup_dropped_bytes.with_label_values(&["en"]).inc();
        m.filter_documents.with_label_values(&["en", "kept"]).inc();
        m.filter_dropped_bytes.with_label_values(&["en"]).inc();
        m.tokenizer_tokens.with_label_values(&["en"]).inc();
        m.sampler_tokens.with_label_values(&["en"]).inc();
        m.sampler_target_share.with_label_values(&["en"]).set(0.5);
        m.sampler_realized_share.with_label_values(&["en"]).set(0.4);
        m.shard_sequences.with_label_values(&["0"]).inc();
        m.trainer_steps.with_label_values(&["0"]).inc();
        m.trainer_tokens.with_label_values(&["0"]).inc();
        m.trainer_tokens_per_second
            .with_label_values(&["0"])
            .set(1.0);
        m.trainer_step_seconds
            .with_label_values(&["0"])
            .observe(0.1);
        m.trainer_data_wait_seconds
            .with_label_values(&["0"])
            .inc_by(0.1);
        m.trainer_data_wait_fraction
            .with_label_values(&["0"])
            .set(0.1);
        m.trainer_loss.with_label_values(&["0"]).set(2.0);
        m.trainer_lr.with_label_values(&["0"]).set(1e-3);
        m.trainer_grad_norm.with_label_values(&["0"]).set(1.0);
        m.trainer_mfu.with_label_values(&["0"]).set(0.1);
        m.trainer_device_memory.with_label_values(&["0"]).set(1);
        m.checkpoint_duration.with_label_values(&["0"]).observe(0.1);
        m.checkpoint_size.with_label_values(&["0"]).set(1);
        m.checkpoint_last_success.with_label_values(&["0"]).set(1.0);
        m.checkpoints.with_label_values(&["0"]).inc();
        m.eval_loss.with_label_values(&["en"]).set(2.5);
        m.eval_tokens.with_label_values(&["en"]).set(100);
        m.eval_step.set(10);
        m.eval_seconds.observe(0.5);
        m.eval_qa
            .with_label_values(&["citation_accuracy", "en"])
            .set(0.5);
        let text = m.encode();
        for name in crate::names::ALL {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from the exposition"
            );
        }
        assert_eq!(
            sample(
                &text,
                r#"lexflow_actor_errors_total{actor="test_encode_actor",kind="test_kind"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"lexflow_edge_blocked_seconds_total{edge="test_encode_edge"}"#
            ),
            Some(0.5)
        );
        assert_eq!(
            sample(&text, r#"lexflow_run_info{run="test-run"}"#),
            Some(1.0)
        );
        assert!(
            !text.contains(r#"run="first-run""#),
            "set_run_labels keeps only the latest run"
        );
        assert_eq!(
            sample(
                &text,
                &format!(
                    r#"lexflow_build_info{{version="{}"}}"#,
                    env!("CARGO_PKG_VERSION")
                )
            ),
            Some(1.0)
        );
        assert!(sample(&text, "lexflow_start_time_seconds").is_some_and(|t| t > 1.6e9));
    }

    /// hdrhistogram with 3 significant digits: every recorded value is reproduced to within 0.1%, so the quantiles of
    /// 1..=1000 ms are the order statistics themselves (to that precision), both from `quantile` and as exported gauges.
    #[test]
    fn quantiles_are_exact_order_statistics_on_known_data() {
        let rec = latency("test_quantile_stage");
        assert_eq!(rec.quantile(0.5), None, "empty recorder has no quantile");
        for ms in (1..=1000u64).rev() {
            rec.record(Duration::from_millis(ms));
        }
        let close = |got: f64, want: f64| (got - want).abs() <= want * 1e-3;
        for (q, want) in [(0.5, 0.500), (0.9, 0.900), (0.99, 0.990), (1.0, 1.000)] {
            let got = rec.quantile(q).expect("non-empty");
            assert!(close(got, want), "p{q}: got {got}, want {want}");
        }
        let text = global().encode();
        for (label, want) in [("0.5", 0.5), ("0.9", 0.9), ("0.99", 0.99), ("1", 1.0)] {
            let series = format!(
                r#"lexflow_stage_latency_quantile_seconds{{quantile="{label}",stage="test_quantile_stage"}}"#
            );
            let got = sample(&text, &series).unwrap_or_else(|| panic!("{series} missing"));
            assert!(close(got, want), "{series}: got {got}, want {want}");
        }
        // The classic histogram saw the same 1000 observations summing to 500.5 s.
        assert_eq!(
            sample(
                &text,
                r#"lexflow_stage_latency_seconds_count{stage="test_quantile_stage"}"#
            ),
            Some(1000.0)
        );
        let sum = sample(
            &text,
            r#"lexflow_stage_latency_seconds_sum{stage="test_quantile_stage"}"#,
        )
        .expect("sum");
        assert!((sum - 500.5).abs() < 1e-6, "sum {sum}");
    }

    #[test]
    fn latency_returns_the_same_recorder_for_a_stage() {
        let a = latency("test_shared_stage");
        let b = latency("test_shared_stage");
        a.record(Duration::from_micros(7));
        assert!(
            b.quantile(1.0).is_some(),
            "the second handle sees the first one's records"
        );
    }
}
