//! The trainer: one actor per rank (= per input edge from the shard writer), each owning its device, model, flat
//! AdamW and collective endpoint. Its components, each in its own file, in the order a rank uses them:
//!
//! | file | component |
//! |---|---|
//! | `setup.rs` | what a rank is given ([`TrainerSetup`], [`EvalSetup`]) and what the ranks report ([`TrainReport`]) |
//! | `launch.rs` | devices, one process per rank (`RANK`/`WORLD_SIZE`/`LOCAL_RANK`), collectives, [`spawn_trainers`] |
//! | `model.rs` | the model's shape: a `train.model` preset or `train.init_from`'s |
//! | `memory.rs` | memory planning (does the state fit, recompute or not) and the FLOP/s peak behind MFU |
//! | `schedule.rs` | the learning-rate schedule and AdamW settings |
//! | `step.rs` | the step loop: receive, vote, forward/backward, reduce, optimizer step, record |
//! | `eval_hook.rs` | held-out loss and Q&A scores every `eval.every` steps |
//! | `checkpoint.rs` | writing, pruning and setting aside checkpoints; the point a resume starts from |
//! | `records.rs` | `steps.jsonl`: what every rank trained on at every step |
//!
//! The trainer uses the stages' types, the tasks (evaluation, decoding) and `common`; it never imports the run.

mod checkpoint;
mod eval_hook;
mod launch;
mod memory;
mod model;
mod records;
mod schedule;
mod setup;
mod step;
#[cfg(test)]
mod tests;

pub use checkpoint::{
    now_nanos, resume_point, set_aside_previous_run, set_aside_unusable, BatchSegment,
    BestCheckpoint, ResumeInfo, TrainerState, BEST_LINK, DATA_STATE_FILE,
};
pub use launch::{process_device, process_group, spawn_trainers};
pub use memory::{cli_plan, parse_bytes, render_plan, PlanRequest};
pub use records::{read_step_records, sequence_hash, StepRecord, STEPS_FILE};
pub use setup::{EvalSetup, TrainHandle, TrainReport, TrainerError, TrainerSetup};
