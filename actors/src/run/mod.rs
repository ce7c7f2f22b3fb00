//! One run: the composition root that wires lanes → stages → trainers (`pipeline`), the checks a resume makes
//! (`inputs`), the run's statistics (`stats`) and the commands that re-read a run (`replay`, `provenance`).

pub mod inputs;
pub mod pipeline;
pub mod replay;
pub mod stats;
