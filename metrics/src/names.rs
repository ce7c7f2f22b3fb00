//! Every metric name of lexflow. Prometheus conventions: `lexflow_` prefix, `_total` for counters, base units.

/// Label keys.
pub const LABEL_ACTOR: &str = "actor";
pub const LABEL_EDGE: &str = "edge";
pub const LABEL_RANK: &str = "rank";
pub const LABEL_LANG: &str = "lang";
pub const LABEL_KIND: &str = "kind";
pub const LABEL_STAGE: &str = "stage";
pub const LABEL_QUANTILE: &str = "quantile";

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
