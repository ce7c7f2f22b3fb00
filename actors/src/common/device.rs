//! The boundary to `lexflow-gpu` that the trainer, the held-out evaluation and the decoding commands share: device
//! names (`cpu`, `cuda:N`) and the view of a packed sequence the GPU crate takes.

use lexflow_gpu::SequenceRef;
use tch::Device;

use crate::types::PackedSequence;

/// A device that is not `cpu`/`cuda:N`, or a CUDA device libtorch does not see; the message says which and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeviceError(pub String);

pub fn parse_device(s: &str) -> Result<Device, DeviceError> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    s.strip_prefix("cuda:")
        .and_then(|n| n.parse().ok())
        .map(Device::Cuda)
        .ok_or_else(|| DeviceError(format!("device `{s}` is not `cpu` or `cuda:N`")))
}

/// A CUDA `device` must be one libtorch sees (`from` names where the device came from, `cpu_hint` how to ask for
/// the CPU instead): libtorch itself would fail deep inside with a panic and a C++ backtrace.
pub fn check_device(device: Device, from: &str, cpu_hint: &str) -> Result<(), DeviceError> {
    let Device::Cuda(i) = device else {
        return Ok(());
    };
    // libtorch counts devices through its CUDA backend, which our binaries do not link: load it first, or it
    // reports 0 devices on any GPU machine.
    lexflow_gpu::init_cuda();
    let visible = tch::Cuda::device_count().max(0) as usize;
    if i >= visible {
        let hint = match visible {
            0 => format!("no GPU, no driver, or a CPU-only libtorch: use {cpu_hint} here"),
            n => format!("use an index below {n} (CUDA_VISIBLE_DEVICES renumbers the GPUs)"),
        };
        return Err(DeviceError(format!(
            "{from}: cuda:{i}, but libtorch sees {visible} CUDA device(s) on this machine ({hint})"
        )));
    }
    Ok(())
}

pub fn seq_ref(s: &PackedSequence) -> SequenceRef<'_> {
    SequenceRef {
        tokens: &s.tokens,
        padding: s.padding,
        doc_starts: &s.doc_starts,
        no_loss: &s.no_loss,
    }
}
