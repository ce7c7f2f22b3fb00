//! The trainer ranks and their components.

pub mod trainer;
