//! The trainer ranks and their components.

mod step;

pub use step::{
    now_nanos, process_device, process_group, read_step_records, resume_point, sequence_hash,
    set_aside_previous_run, set_aside_unusable, spawn_trainers, BatchSegment, EvalSetup,
    ResumeInfo, StepRecord, TrainHandle, TrainReport, TrainerError, TrainerSetup, TrainerState,
    DATA_STATE_FILE, STEPS_FILE,
};
