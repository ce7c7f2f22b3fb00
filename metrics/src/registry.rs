use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hdrhistogram::Histogram as Hdr;
use prometheus::{
    exponential_buckets, Counter, CounterVec, Gauge, GaugeVec, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::names::*;

/// All lexflow metric families, registered once in one [`Registry`].
pub struct Metrics {
    pub registry: Registry,
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
    latencies: Mutex<Vec<(String, LatencyRecorder)>>,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let icv = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let cv = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, CounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let gv = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let igv = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let hv = |name: &str, help: &str, labels: &[&str], start: f64| {
            let opts = HistogramOpts::new(name, help)
                .buckets(exponential_buckets(start, 2.0, 24).expect("valid buckets"));
            reg(&r, HistogramVec::new(opts, labels).expect("valid metric"))
        };
        let ic = |name: &str, help: &str| reg(&r, IntCounter::new(name, help).expect("valid"));
        Metrics {
            actor_items_in: icv(ACTOR_ITEMS_IN_TOTAL, "Items received by an actor", &[LABEL_ACTOR]),
            actor_items_out: icv(ACTOR_ITEMS_OUT_TOTAL, "Items emitted by an actor", &[LABEL_ACTOR]),
            actor_bytes_in: icv(ACTOR_BYTES_IN_TOTAL, "Bytes received by an actor", &[LABEL_ACTOR]),
            actor_bytes_out: icv(ACTOR_BYTES_OUT_TOTAL, "Bytes emitted by an actor", &[LABEL_ACTOR]),
            actor_errors: icv(ACTOR_ERRORS_TOTAL, "Errors by actor and kind", &[LABEL_ACTOR, LABEL_KIND]),
            actor_busy_seconds: cv(ACTOR_BUSY_SECONDS_TOTAL, "Time an actor spent processing", &[LABEL_ACTOR]),
            edge_depth: igv(EDGE_QUEUE_DEPTH, "Messages queued on an edge", &[LABEL_EDGE]),
            edge_capacity: igv(EDGE_CAPACITY, "Capacity of an edge in messages", &[LABEL_EDGE]),
            edge_sent: icv(EDGE_SENT_TOTAL, "Messages sent over an edge", &[LABEL_EDGE]),
            edge_blocked_seconds: cv(EDGE_BLOCKED_SECONDS_TOTAL, "Time senders spent blocked on a full edge (backpressure)", &[LABEL_EDGE]),
            edge_starved_seconds: cv(EDGE_STARVED_SECONDS_TOTAL, "Time receivers spent waiting on an empty edge (starvation)", &[LABEL_EDGE]),
            stage_latency: hv(STAGE_LATENCY_SECONDS, "Time to process one message in a stage", &[LABEL_STAGE], 1e-6),
            stage_latency_quantile: gv(STAGE_LATENCY_QUANTILE_SECONDS, "Exact in-process latency quantiles (hdrhistogram)", &[LABEL_STAGE, LABEL_QUANTILE]),
            reader_files: icv(READER_FILES_TOTAL, "Input files read", &[LABEL_LANG]),
            reader_documents: icv(READER_DOCUMENTS_TOTAL, "Documents parsed", &[LABEL_LANG]),
            reader_quarantined: ic(READER_QUARANTINED_FILES_TOTAL, "Input files quarantined as bad"),
            tokenizer_tokens: icv(TOKENIZER_TOKENS_TOTAL, "Tokens produced by the tokenizers", &[LABEL_LANG]),
            sampler_tokens: icv(SAMPLER_TOKENS_TOTAL, "Tokens emitted by the language sampler", &[LABEL_LANG]),
            sampler_target_share: gv(SAMPLER_TARGET_SHARE, "Target token share of a language", &[LABEL_LANG]),
            sampler_realized_share: gv(SAMPLER_REALIZED_SHARE, "Realized token share of a language", &[LABEL_LANG]),
            packer_sequences: ic(PACKER_SEQUENCES_TOTAL, "Packed sequences emitted"),
            packer_padding_tokens: ic(PACKER_PADDING_TOKENS_TOTAL, "Padding tokens in packed sequences"),
            packer_truncated_tokens: ic(PACKER_TRUNCATED_TOKENS_TOTAL, "Document tokens dropped by truncation"),
            packer_truncated_documents: ic(PACKER_TRUNCATED_DOCUMENTS_TOTAL, "Documents split or truncated by the packer"),
            packer_fill_efficiency: reg(&r, Gauge::new(PACKER_FILL_EFFICIENCY, "Share of non-padding tokens in packed sequences").expect("valid")),
            shard_sequences: icv(SHARD_SEQUENCES_TOTAL, "Sequences routed to a rank", &[LABEL_RANK]),
            trainer_steps: icv(TRAINER_STEPS_TOTAL, "Optimizer steps", &[LABEL_RANK]),
            trainer_tokens: icv(TRAINER_TOKENS_TOTAL, "Tokens trained on", &[LABEL_RANK]),
            trainer_tokens_per_second: gv(TRAINER_TOKENS_PER_SECOND, "Training throughput", &[LABEL_RANK]),
            trainer_step_seconds: hv(TRAINER_STEP_SECONDS, "Wall time of one optimizer step", &[LABEL_RANK], 1e-3),
            trainer_data_wait_seconds: cv(TRAINER_DATA_WAIT_SECONDS_TOTAL, "Time a trainer waited for data", &[LABEL_RANK]),
            trainer_data_wait_fraction: gv(TRAINER_DATA_WAIT_FRACTION, "Share of step time spent waiting for data", &[LABEL_RANK]),
            trainer_loss: gv(TRAINER_LOSS, "Training loss of the last step", &[LABEL_RANK]),
            trainer_lr: gv(TRAINER_LEARNING_RATE, "Learning rate of the last step", &[LABEL_RANK]),
            trainer_grad_norm: gv(TRAINER_GRAD_NORM, "Global gradient norm before clipping", &[LABEL_RANK]),
            trainer_mfu: gv(TRAINER_MFU_RATIO, "Model FLOPs utilisation estimate", &[LABEL_RANK]),
            trainer_device_memory: igv(TRAINER_DEVICE_MEMORY_BYTES, "Device memory in use", &[LABEL_RANK]),
            checkpoint_duration: hv(CHECKPOINT_DURATION_SECONDS, "Time to write a checkpoint", &[LABEL_RANK], 1e-3),
            checkpoint_size: igv(CHECKPOINT_SIZE_BYTES, "Size of the last checkpoint", &[LABEL_RANK]),
            checkpoint_last_success: gv(CHECKPOINT_LAST_SUCCESS_TIMESTAMP_SECONDS, "Unix time of the last successful checkpoint", &[LABEL_RANK]),
            checkpoints: icv(CHECKPOINTS_TOTAL, "Checkpoints written", &[LABEL_RANK]),
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
                self.stage_latency_quantile.with_label_values(&[stage, label]).set(v);
            }
        }
    }
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
        global().actor_errors.with_label_values(&[&self.name, kind]).inc();
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
