//! # lexflow-gpu
//!
//! Everything that touches tch/libtorch, and nothing else: the LLaMA model, the loss, AdamW over flat buffers,
//! gradient collectives (in-process for CPU ranks; NCCL through cudarc behind the `cuda` feature) and model checkpoint
//! I/O in the Hugging Face safetensors layout. No channels, no actors.
