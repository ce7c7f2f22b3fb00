//! Every metric name of lexflow. Prometheus conventions: `lexflow_` prefix, `_total` for counters, base units.

/// Label keys.
pub const LABEL_ACTOR: &str = "actor";
pub const LABEL_EDGE: &str = "edge";
pub const LABEL_RANK: &str = "rank";
pub const LABEL_LANG: &str = "lang";
pub const LABEL_KIND: &str = "kind";
pub const LABEL_STAGE: &str = "stage";
pub const LABEL_QUANTILE: &str = "quantile";
pub const LABEL_VERSION: &str = "version";
pub const LABEL_RUN: &str = "run";
pub const LABEL_METRIC: &str = "metric";
pub const LABEL_RESULT: &str = "result";

// Process identity: constant-1 gauges whose labels carry the information (the `*_info` convention), so a dashboard
// can join on them or show them as text.
pub const BUILD_INFO: &str = "lexflow_build_info";
pub const RUN_INFO: &str = "lexflow_run_info";
pub const START_TIME_SECONDS: &str = "lexflow_start_time_seconds";

// Per actor.
pub const ACTOR_ITEMS_IN_TOTAL: &str = "lexflow_actor_items_in_total";
pub const ACTOR_ITEMS_OUT_TOTAL: &str = "lexflow_actor_items_out_total";
pub const ACTOR_BYTES_IN_TOTAL: &str = "lexflow_actor_bytes_in_total";
pub const ACTOR_BYTES_OUT_TOTAL: &str = "lexflow_actor_bytes_out_total";
pub const ACTOR_ERRORS_TOTAL: &str = "lexflow_actor_errors_total";
pub const ACTOR_BUSY_SECONDS_TOTAL: &str = "lexflow_actor_busy_seconds_total";

// Per edge.
pub const EDGE_QUEUE_DEPTH: &str = "lexflow_edge_queue_depth";
pub const EDGE_CAPACITY: &str = "lexflow_edge_capacity";
pub const EDGE_SENT_TOTAL: &str = "lexflow_edge_sent_total";
pub const EDGE_BLOCKED_SECONDS_TOTAL: &str = "lexflow_edge_blocked_seconds_total";
pub const EDGE_STARVED_SECONDS_TOTAL: &str = "lexflow_edge_starved_seconds_total";

// Per stage latency (one batch through one actor).
pub const STAGE_LATENCY_SECONDS: &str = "lexflow_stage_latency_seconds";
pub const STAGE_LATENCY_QUANTILE_SECONDS: &str = "lexflow_stage_latency_quantile_seconds";

// Reader.
pub const READER_FILES_TOTAL: &str = "lexflow_reader_files_total";
pub const READER_DOCUMENTS_TOTAL: &str = "lexflow_reader_documents_total";
pub const READER_QUARANTINED_FILES_TOTAL: &str = "lexflow_reader_quarantined_files_total";

// Dedup (`[dedup]`): documents by result (`kept`, `exact`, `near`, `heldout`), text dropped.
pub const DEDUP_DOCUMENTS_TOTAL: &str = "lexflow_dedup_documents_total";
pub const DEDUP_DROPPED_BYTES_TOTAL: &str = "lexflow_dedup_dropped_bytes_total";

// Quality filter (`[filter]`): documents by result (`kept`, or the reason of a drop: `recency`, `type`, `length`,
// `subject`), text dropped.
pub const FILTER_DOCUMENTS_TOTAL: &str = "lexflow_filter_documents_total";
pub const FILTER_DROPPED_BYTES_TOTAL: &str = "lexflow_filter_dropped_bytes_total";

// Tokenizer.
pub const TOKENIZER_TOKENS_TOTAL: &str = "lexflow_tokenizer_tokens_total";

// Sampler.
pub const SAMPLER_TOKENS_TOTAL: &str = "lexflow_sampler_tokens_total";
pub const SAMPLER_TARGET_SHARE: &str = "lexflow_sampler_target_share";
pub const SAMPLER_REALIZED_SHARE: &str = "lexflow_sampler_realized_share";

// Packer.
pub const PACKER_SEQUENCES_TOTAL: &str = "lexflow_packer_sequences_total";
pub const PACKER_PADDING_TOKENS_TOTAL: &str = "lexflow_packer_padding_tokens_total";
pub const PACKER_TRUNCATED_TOKENS_TOTAL: &str = "lexflow_packer_truncated_tokens_total";
pub const PACKER_TRUNCATED_DOCUMENTS_TOTAL: &str = "lexflow_packer_truncated_documents_total";
pub const PACKER_FILL_EFFICIENCY: &str = "lexflow_packer_fill_efficiency";

// Shard writer.
pub const SHARD_SEQUENCES_TOTAL: &str = "lexflow_shard_sequences_total";

// Trainer (label rank).
pub const TRAINER_STEPS_TOTAL: &str = "lexflow_trainer_steps_total";
pub const TRAINER_TOKENS_TOTAL: &str = "lexflow_trainer_tokens_total";
pub const TRAINER_TOKENS_PER_SECOND: &str = "lexflow_trainer_tokens_per_second";
pub const TRAINER_STEP_SECONDS: &str = "lexflow_trainer_step_seconds";
pub const TRAINER_DATA_WAIT_SECONDS_TOTAL: &str = "lexflow_trainer_data_wait_seconds_total";
pub const TRAINER_DATA_WAIT_FRACTION: &str = "lexflow_trainer_data_wait_fraction";
pub const TRAINER_LOSS: &str = "lexflow_trainer_loss";
pub const TRAINER_LEARNING_RATE: &str = "lexflow_trainer_learning_rate";
pub const TRAINER_GRAD_NORM: &str = "lexflow_trainer_grad_norm";
pub const TRAINER_MFU_RATIO: &str = "lexflow_trainer_mfu_ratio";
pub const TRAINER_DEVICE_MEMORY_BYTES: &str = "lexflow_trainer_device_memory_bytes";

// Checkpoints.
pub const CHECKPOINT_DURATION_SECONDS: &str = "lexflow_checkpoint_duration_seconds";
pub const CHECKPOINT_SIZE_BYTES: &str = "lexflow_checkpoint_size_bytes";
pub const CHECKPOINT_LAST_SUCCESS_TIMESTAMP_SECONDS: &str =
    "lexflow_checkpoint_last_success_timestamp_seconds";
pub const CHECKPOINTS_TOTAL: &str = "lexflow_checkpoints_total";

// Held-out evaluation (`[eval]`; label lang, plus lang="all").
pub const EVAL_LOSS: &str = "lexflow_eval_loss";
pub const EVAL_TOKENS: &str = "lexflow_eval_tokens";
pub const EVAL_STEP: &str = "lexflow_eval_step";
pub const EVAL_SECONDS: &str = "lexflow_eval_seconds";
/// Q&A scores (`eval.qa_gold`; labels metric, lang).
pub const EVAL_QA: &str = "lexflow_eval_qa";

/// Every metric family name above, for tests and dashboards to check their references against.
/// (A unit test keeps this list and the constants of this file in step.)
pub const ALL: &[&str] = &[
    BUILD_INFO,
    RUN_INFO,
    START_TIME_SECONDS,
    ACTOR_ITEMS_IN_TOTAL,
    ACTOR_ITEMS_OUT_TOTAL,
    ACTOR_BYTES_IN_TOTAL,
    ACTOR_BYTES_OUT_TOTAL,
    ACTOR_ERRORS_TOTAL,
    ACTOR_BUSY_SECONDS_TOTAL,
    EDGE_QUEUE_DEPTH,
    EDGE_CAPACITY,
    EDGE_SENT_TOTAL,
    EDGE_BLOCKED_SECONDS_TOTAL,
    EDGE_STARVED_SECONDS_TOTAL,
    STAGE_LATENCY_SECONDS,
    STAGE_LATENCY_QUANTILE_SECONDS,
    READER_FILES_TOTAL,
    READER_DOCUMENTS_TOTAL,
    READER_QUARANTINED_FILES_TOTAL,
    DEDUP_DOCUMENTS_TOTAL,
    DEDUP_DROPPED_BYTES_TOTAL,
    FILTER_DOCUMENTS_TOTAL,
    FILTER_DROPPED_BYTES_TOTAL,
    TOKENIZER_TOKENS_TOTAL,
    SAMPLER_TOKENS_TOTAL,
    SAMPLER_TARGET_SHARE,
    SAMPLER_REALIZED_SHARE,
    PACKER_SEQUENCES_TOTAL,
    PACKER_PADDING_TOKENS_TOTAL,
    PACKER_TRUNCATED_TOKENS_TOTAL,
    PACKER_TRUNCATED_DOCUMENTS_TOTAL,
    PACKER_FILL_EFFICIENCY,
    SHARD_SEQUENCES_TOTAL,
    TRAINER_STEPS_TOTAL,
    TRAINER_TOKENS_TOTAL,
    TRAINER_TOKENS_PER_SECOND,
    TRAINER_STEP_SECONDS,
    TRAINER_DATA_WAIT_SECONDS_TOTAL,
    TRAINER_DATA_WAIT_FRACTION,
    TRAINER_LOSS,
    TRAINER_LEARNING_RATE,
    TRAINER_GRAD_NORM,
    TRAINER_MFU_RATIO,
    TRAINER_DEVICE_MEMORY_BYTES,
    CHECKPOINT_DURATION_SECONDS,
    CHECKPOINT_SIZE_BYTES,
    CHECKPOINT_LAST_SUCCESS_TIMESTAMP_SECONDS,
    CHECKPOINTS_TOTAL,
    EVAL_LOSS,
    EVAL_TOKENS,
    EVAL_STEP,
    EVAL_SECONDS,
    EVAL_QA,
];

/// Families exported as Prometheus histograms: queries see them as `<name>_bucket`, `<name>_sum`, `<name>_count`.
pub const HISTOGRAMS: &[&str] = &[
    STAGE_LATENCY_SECONDS,
    TRAINER_STEP_SECONDS,
    CHECKPOINT_DURATION_SECONDS,
    EVAL_SECONDS,
];

/// The family a series name in a query belongs to (`lexflow_trainer_step_seconds_bucket` → the histogram's name),
/// or None when the name is not a lexflow metric.
pub fn family_of(series: &str) -> Option<&'static str> {
    if let Some(n) = ALL.iter().find(|n| **n == series) {
        return Some(n);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = series.strip_suffix(suffix)?;
        HISTOGRAMS.iter().find(|n| **n == base).copied()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `"lexflow_…"` constant of this file is in [`ALL`], once.
    #[test]
    fn all_lists_every_constant_once() {
        let src = include_str!("names.rs");
        let declared: Vec<&str> = src
            .lines()
            .filter(|l| l.starts_with("pub const ") && !l.contains("LABEL_"))
            .filter_map(|l| l.split('"').nth(1))
            .filter(|n| n.starts_with("lexflow_"))
            .collect();
        // Constants whose value sits on the next line (rustfmt wraps long ones).
        let wrapped: Vec<&str> = src
            .lines()
            .filter(|l| l.trim_start().starts_with("\"lexflow_"))
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        let mut all_declared: Vec<&str> = declared.into_iter().chain(wrapped).collect();
        all_declared.sort_unstable();
        let mut listed = ALL.to_vec();
        listed.sort_unstable();
        let before = listed.len();
        listed.dedup();
        assert_eq!(before, listed.len(), "a name is listed twice in ALL");
        assert_eq!(all_declared, listed);
    }

    #[test]
    fn family_of_strips_histogram_suffixes_only_for_histograms() {
        assert_eq!(
            family_of("lexflow_trainer_step_seconds_bucket"),
            Some(TRAINER_STEP_SECONDS)
        );
        assert_eq!(family_of("lexflow_trainer_loss"), Some(TRAINER_LOSS));
        assert_eq!(family_of("lexflow_trainer_loss_bucket"), None);
        assert_eq!(family_of("lexflow_no_such_metric"), None);
    }
}
