//! # lexflow-metrics
//!
//! One process-wide Prometheus registry for every lexflow crate. Metric names live in [`names`] and nowhere else, so a
//! dashboard, a test and the code that records a value cannot disagree on spelling. Handles are cheap clones of
//! Prometheus vectors with labels already applied: an actor asks once for its [`ActorMetrics`], an edge for its
//! [`EdgeMetrics`], and records on the hot path without locks or allocation.
//!
//! Latencies go into [`LatencyRecorder`]s (hdrhistogram, exact in-process quantiles) whose p50/p90/p99/max are exported
//! as gauges at scrape time, next to a classic Prometheus histogram for `histogram_quantile` over time ranges.
//! [`serve`] starts the `/metrics` HTTP endpoint (default `127.0.0.1:9400`).

pub mod names;
mod registry;
mod server;

pub use registry::{
    actor, edge, global, latency, set_run_labels, ActorMetrics, EdgeMetrics, LatencyRecorder,
    Metrics,
};
pub use server::{serve, MetricsServer, ServeError};
