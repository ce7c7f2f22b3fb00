//! # lexflow-gpu
//!
//! Everything that touches tch/libtorch, and nothing else: the LLaMA model, the loss, AdamW over flat buffers,
//! gradient collectives (in-process for CPU ranks; NCCL through cudarc behind the `cuda` feature) and model checkpoint
//! I/O in the Hugging Face safetensors layout. No channels, no actors.
//!
//! The pieces, in the order a training step uses them:
//!
//! * [`Batch`] turns packed sequences (`seq_len + 1` token ids, trailing padding, document starts) into input and
//!   label tensors plus per-position document ordinals, from which the model builds a block-diagonal causal mask.
//! * [`Llama`] is the LLaMA 3 architecture (RMSNorm, RoPE with Llama 3.1 scaling, GQA through
//!   `scaled_dot_product_attention`, SwiGLU) whose parameters are views into one flat buffer ([`Params`]) named with
//!   the Hugging Face `LlamaForCausalLM` keys; [`LlamaConfig`] has the `tiny`, `125m`, `1b`, `8b`, `70b` presets.
//! * [`cross_entropy_sum`] is the next-token loss over non-padding targets; the trainer divides by the valid targets
//!   of the whole global step, so data parallelism does not change the gradient.
//! * [`FlatAdamW`] gathers gradients into one flat fp32 buffer, which a [`Collective`] averages across ranks, then
//!   clips and applies AdamW (fp32 master weights; bf16 parameters on CUDA) with a warmup + cosine schedule; or,
//!   sharded (ZeRO-2), reduce-scatters them so each rank updates and keeps the state of `1/world` of the weights,
//!   then all-gathers the parameters.
//! * [`checkpoint`] writes and reads safetensors (HF layout, sharded above a size, `config.json`) and atomic
//!   checkpoint directories with SHA-256 manifests.
//!
//! Tensors are `Send` but not `Sync`: each trainer thread owns its model, optimizer and collective endpoint.

mod batch;
pub mod checkpoint;
mod collective;
mod error;
mod fsdp;
mod loss;
mod model;
pub mod ops;
mod optim;
pub mod plan;

pub use batch::{valid_targets, Batch, SequenceRef, IGNORE_INDEX};
pub use collective::watchdog;
pub use collective::{Collective, InProcessCollective, SingleRank, TcpCollective};
#[cfg(feature = "cuda")]
pub use collective::{NcclCollective, NcclUniqueId};
pub use error::{GpuError, Result};
pub use fsdp::ShardedLlama;
pub use loss::{cross_entropy_mean, cross_entropy_sum, cross_entropy_sum_backward};
pub use model::{
    document_mask, unit_forward_backward, unit_logits, KvCache, Llama, LlamaConfig, Param,
    ParamLayout, ParamSpec, Params, RopeScaling, Unit, UnitSource, LLAMA3_VOCAB,
};
pub use optim::{
    part_file, read_optimizer_state, AdamWConfig, FlatAdamW, LrSchedule, Piece, ShardLayout,
    StepStats, NORM_BLOCK, OPTIMIZER_FILE, OPTIMIZER_PARTS,
};
/// Makes sure libtorch's CUDA backend is loaded, and says whether a CUDA device is usable.
///
/// tch links `libtorch_cuda.so`, but no symbol of it is referenced directly, so the linker's `--as-needed` (rustc's
/// default on Linux) drops it from our binaries: libtorch then has no CUDA backend at all ("Could not run
/// 'aten::empty.memory_format' with arguments from the 'CUDA' backend"). Loading it at run time registers the backend
/// (its static initialisers), exactly as importing torch in Python does. Idempotent and cheap; [`Llama::new`] and the
/// NCCL collective call it for CUDA devices. The library is found through `LD_LIBRARY_PATH` (the python torch's `lib`).
pub fn init_cuda() -> bool {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        extern "C" {
            fn dlopen(
                filename: *const std::ffi::c_char,
                flag: std::ffi::c_int,
            ) -> *mut std::ffi::c_void;
            fn dlerror() -> *const std::ffi::c_char;
        }
        const RTLD_NOW: std::ffi::c_int = 2;
        const RTLD_GLOBAL: std::ffi::c_int = 0x100;
        let name = c"libtorch_cuda.so";
        // SAFETY: dlopen/dlerror with a valid NUL-terminated name; the handle is intentionally never closed.
        let handle = unsafe { dlopen(name.as_ptr(), RTLD_NOW | RTLD_GLOBAL) };
        if handle.is_null() {
            // SAFETY: dlerror returns a NUL-terminated message (or null) owned by libc.
            let msg = unsafe {
                let e = dlerror();
                if e.is_null() {
                    String::from("unknown error")
                } else {
                    std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
                }
            };
            tracing::warn!("cannot load libtorch_cuda.so (no CUDA backend in libtorch): {msg}");
        }
    });
    tch::Cuda::is_available()
}

/// Device memory in use on the calling thread's current CUDA device (total − free, as `nvidia-smi` counts it:
/// libtorch's cached blocks included), or None without the `cuda` feature or a current CUDA context (call it from a
/// thread that has run CUDA work, such as a trainer rank after its first step).
pub fn cuda_memory_used() -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        std::panic::catch_unwind(|| {
            cudarc::driver::result::mem_get_info()
                .ok()
                .map(|(free, total)| (total - free) as u64)
        })
        .ok()
        .flatten()
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

/// Total memory of CUDA device `ordinal` (`cuDeviceTotalMem`), or None without the `cuda` feature or a driver.
pub fn cuda_memory_total(ordinal: usize) -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        // cudarc loads libcuda lazily and panics when it is missing: that is a "don't know", not a failure.
        std::panic::catch_unwind(|| {
            cudarc::driver::result::init().ok()?;
            let dev = cudarc::driver::result::device::get(ordinal as i32).ok()?;
            // SAFETY: `dev` is a valid device handle from the driver.
            unsafe { cudarc::driver::result::device::total_mem(dev) }
                .ok()
                .map(|b| b as u64)
        })
        .ok()
        .flatten()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        None
    }
}

/// Bytes a trainer rank holds for `n_params` parameters whatever the batch: parameters and their gradients in the
/// model dtype (`param_bytes` each), plus this rank's share (`1/shards`: 1 when replicated, the world size when the
/// optimizer is sharded) of the fp32 master weights (shared with the parameters when they are fp32), the two AdamW
/// moments and the reduced fp32 gradient.
pub fn train_state_bytes(n_params: u64, param_bytes: u64, shards: u64) -> u64 {
    let master = if param_bytes == 4 { 0 } else { 4 };
    n_params * 2 * param_bytes + n_params * (master + 4 + 4 + 4) / shards.max(1)
}

/// The tch version this crate is built on, for callers that inspect tensors (tests, tools).
pub use tch;
