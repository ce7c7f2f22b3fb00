//! Safe wrappers over `csrc/lexflow_ops.cpp`: the two ATen operators tch 0.24 does not bind, called through
//! libtorch's dispatcher (autograd and device dispatch as under PyTorch).
//!
//! * [`flash_varlen`]: `at::_flash_attention_forward` with cumulative sequence lengths — causal attention inside
//!   each packed document in one kernel launch per layer, GQA native, differentiable (libtorch registers its
//!   backward). CUDA with bf16/fp16 only: [`flash_varlen_supported`] says when it applies.
//! * [`fused_adamw`]: `at::_fused_adamw_`, the kernel of `torch.optim.AdamW(fused=True)` (CPU and CUDA).
//! * [`backward_with_grad`]: `torch.autograd.backward(t, grad)` for a non-scalar `t` (the loss hands its
//!   gradient straight to the logits).
//! * [`Profiler`]: libtorch's Kineto profiler (the engine of `torch.profiler`), written as a Chrome trace that
//!   `bench/gpu/kernels.py` summarises the same way for lexflow and for the PyTorch reference.

use std::ffi::c_char;

use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use crate::error::{GpuError, Result};

extern "C" {
    fn lexflow_flash_varlen(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        cu_seqlens: *const C_tensor,
        max_len: i64,
        scale: f64,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    #[allow(clippy::too_many_arguments)]
    fn lexflow_fused_adamw(
        params: *const *const C_tensor,
        grads: *const *const C_tensor,
        exp_avgs: *const *const C_tensor,
        exp_avg_sqs: *const *const C_tensor,
        steps: *const *const C_tensor,
        n: i64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        grad_scale: *const C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

extern "C" {
    fn lexflow_pin_memory(
        t: *const C_tensor,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn lexflow_backward_with_grad(
        t: *const C_tensor,
        grad: *const C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn lexflow_profiler_start(cuda: i32, err: *mut c_char, err_len: usize) -> i32;
    fn lexflow_profiler_stop(path: *const c_char, err: *mut c_char, err_len: usize) -> i32;
}

const ERR_LEN: usize = 2048;

fn check(rc: i32, err: &[u8], what: &str) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    let msg = String::from_utf8_lossy(&err[..end]);
    // libtorch messages end with a C++ backtrace hint; the first lines say what went wrong.
    let msg: String = msg.lines().take(3).collect::<Vec<_>>().join(" | ");
    Err(GpuError::Tch(tch::TchError::Torch(format!(
        "{what}: {msg}"
    ))))
}

/// Whether [`flash_varlen`] can run on tensors like `q`: CUDA, bf16 or fp16, head_dim a multiple of 8 up to 256.
pub fn flash_varlen_supported(q: &Tensor) -> bool {
    let hd = q.size().last().copied().unwrap_or(0);
    q.device().is_cuda()
        && matches!(q.kind(), Kind::BFloat16 | Kind::Half)
        && hd % 8 == 0
        && hd <= 256
}

/// Causal attention within each document of a packed batch.
///
/// `q`: `(total, H, hd)`, `k`, `v`: `(total, H_kv, hd)` with `H_kv` dividing `H` (GQA), all contiguous in the last
/// dimension; `cu_seqlens`: int32 `(n_docs + 1)` on the same device, `0, len_0, len_0 + len_1, …, total`;
/// `max_len`: the longest document. Returns `(total, H, hd)`; softmax scale `1/√hd`. Differentiable.
pub fn flash_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &Tensor,
    max_len: i64,
) -> Result<Tensor> {
    let mut err = [0u8; ERR_LEN];
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: the handles come from live tch tensors borrowed for the call; the C++ side catches every exception
    // and on success stores a new heap-allocated at::Tensor, whose ownership passes to the returned Tensor.
    let rc = unsafe {
        lexflow_flash_varlen(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            cu_seqlens.as_ptr(),
            max_len,
            0.0,
            &mut out,
            err.as_mut_ptr() as *mut c_char,
            ERR_LEN,
        )
    };
    check(rc, &err, "varlen flash attention")?;
    // SAFETY: rc == 0 guarantees `out` is a valid, owned at::Tensor handle.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// One group of tensors for [`fused_adamw`]: parameters (updated in place), gradients, moments, step counter.
pub struct AdamWGroup<'a> {
    pub params: &'a Tensor,
    pub grads: &'a Tensor,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
    /// fp32 scalar on the parameters' device holding the step being taken (1 for the first step).
    pub step: &'a Tensor,
}

/// Hyper-parameters of one [`fused_adamw`] call.
#[derive(Debug, Clone, Copy)]
pub struct AdamWArgs {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// `torch.optim.AdamW(fused=True)`'s update over `groups` (all with the same hyper-parameters), in one kernel
/// launch per dtype/device: `p *= 1 − lr·wd; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²;
/// p −= lr/bc1 · m / (√v/√bc2 + eps)`, with `g = grad / grad_scale` when a scale is given (0-dim fp32 on the device:
/// gradient clipping without a separate pass over the gradient; the gradient is left divided by it).
///
/// Every tensor of a group must be contiguous fp32 with the same number of elements on one device (checked here:
/// libtorch's CPU kernel does not check lengths).
pub fn fused_adamw(
    groups: &[AdamWGroup<'_>],
    args: AdamWArgs,
    grad_scale: Option<&Tensor>,
) -> Result<()> {
    for (i, g) in groups.iter().enumerate() {
        let n = g.params.numel();
        let dev = g.params.device();
        for (name, t) in [
            ("params", g.params),
            ("grads", g.grads),
            ("exp_avg", g.exp_avg),
            ("exp_avg_sq", g.exp_avg_sq),
        ] {
            if t.numel() != n || t.kind() != Kind::Float || t.device() != dev || !t.is_contiguous()
            {
                return Err(GpuError::Tch(tch::TchError::Torch(format!(
                    "fused AdamW group {i}: {name} is {:?} {:?} on {:?} (contiguous: {}), params are [{n}] Float on \
                     {dev:?}",
                    t.size(),
                    t.kind(),
                    t.device(),
                    t.is_contiguous()
                ))));
            }
        }
        if g.step.numel() != 1 || g.step.kind() != Kind::Float || g.step.device() != dev {
            return Err(GpuError::Tch(tch::TchError::Torch(format!(
                "fused AdamW group {i}: step must be one Float on {dev:?}"
            ))));
        }
    }
    if let Some(s) = grad_scale {
        if s.numel() != 1 || s.kind() != Kind::Float {
            return Err(GpuError::Tch(tch::TchError::Torch(
                "fused AdamW: grad_scale must be one Float".into(),
            )));
        }
    }
    let ptrs = |f: &dyn Fn(&AdamWGroup<'_>) -> *const C_tensor| -> Vec<*const C_tensor> {
        groups.iter().map(f).collect()
    };
    let p = ptrs(&|x| x.params.as_ptr());
    let g = ptrs(&|x| x.grads.as_ptr());
    let m = ptrs(&|x| x.exp_avg.as_ptr());
    let v = ptrs(&|x| x.exp_avg_sq.as_ptr());
    let s = ptrs(&|x| x.step.as_ptr());
    let mut err = [0u8; ERR_LEN];
    // SAFETY: every pointer array has `groups.len()` live tensor handles borrowed for the call; the C++ side only
    // reads them (the tensors' storage is updated in place by the kernel) and catches every exception.
    let rc = unsafe {
        lexflow_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            groups.len() as i64,
            args.lr,
            args.beta1,
            args.beta2,
            args.weight_decay,
            args.eps,
            grad_scale.map_or(std::ptr::null(), |t| t.as_ptr()),
            err.as_mut_ptr() as *mut c_char,
            ERR_LEN,
        )
    };
    check(rc, &err, "fused AdamW")
}

/// A page-locked (pinned) copy of a CPU tensor, from which host-to-device copies can be asynchronous. Needs a CUDA
/// runtime (an error otherwise).
pub fn pin_memory(t: &Tensor) -> Result<Tensor> {
    let mut err = [0u8; ERR_LEN];
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: `t` is a live tch tensor borrowed for the call; on success `out` holds a new owned at::Tensor handle.
    let rc = unsafe {
        lexflow_pin_memory(
            t.as_ptr(),
            &mut out,
            err.as_mut_ptr() as *mut c_char,
            ERR_LEN,
        )
    };
    check(rc, &err, "pin_memory")?;
    // SAFETY: rc == 0 guarantees `out` is a valid, owned at::Tensor handle.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `torch.autograd.backward(t, grad)`: back-propagates `grad` (same shape as `t`) through `t`'s graph, accumulating
/// into the leaves' gradients. tch only offers `backward()` from a scalar.
pub fn backward_with_grad(t: &Tensor, grad: &Tensor) -> Result<()> {
    let mut err = [0u8; ERR_LEN];
    // SAFETY: both handles are live tch tensors borrowed for the call; the C++ side catches every exception.
    let rc = unsafe {
        lexflow_backward_with_grad(
            t.as_ptr(),
            grad.as_ptr(),
            err.as_mut_ptr() as *mut c_char,
            ERR_LEN,
        )
    };
    check(rc, &err, "backward")
}

/// A running Kineto profiler; [`Profiler::stop`] writes the trace. Start and stop on the same thread.
pub struct Profiler {
    running: bool,
}

impl Profiler {
    /// Starts recording CPU operators (and, with `cuda`, every CUDA kernel and copy with its device time).
    pub fn start(cuda: bool) -> Result<Profiler> {
        let mut err = [0u8; ERR_LEN];
        // SAFETY: the error buffer outlives the call; the C++ side catches every exception.
        let rc = unsafe {
            lexflow_profiler_start(cuda as i32, err.as_mut_ptr() as *mut c_char, ERR_LEN)
        };
        check(rc, &err, "starting the profiler")?;
        Ok(Profiler { running: true })
    }

    /// Stops recording and writes the Chrome trace (JSON) to `path`.
    pub fn stop(mut self, path: &std::path::Path) -> Result<()> {
        self.running = false;
        let c = std::ffi::CString::new(path.to_string_lossy().as_bytes()).map_err(|_| {
            GpuError::Tch(tch::TchError::Torch(format!(
                "profiler trace path {} contains a NUL byte",
                path.display()
            )))
        })?;
        let mut err = [0u8; ERR_LEN];
        // SAFETY: `c` and the error buffer outlive the call; the C++ side catches every exception.
        let rc =
            unsafe { lexflow_profiler_stop(c.as_ptr(), err.as_mut_ptr() as *mut c_char, ERR_LEN) };
        check(
            rc,
            &err,
            &format!("writing the profiler trace {}", path.display()),
        )
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        if self.running {
            let mut err = [0u8; ERR_LEN];
            let dev_null = c"/dev/null";
            // SAFETY: as in `stop`; a profiler dropped without `stop` is switched off, its trace discarded.
            let _ = unsafe {
                lexflow_profiler_stop(dev_null.as_ptr(), err.as_mut_ptr() as *mut c_char, ERR_LEN)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn fused_adamw_matches_the_adamw_formula() {
        let n = 1000;
        // Held for the whole test: it draws throughout (and creates no model).
        let _g = crate::model::rng_lock();
        tch::manual_seed(7);
        let p0 = Tensor::randn([n], (Kind::Float, Device::Cpu));
        let g0 = Tensor::randn([n], (Kind::Float, Device::Cpu));
        let g = g0.copy();
        let m0 = Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.1;
        let v0 = Tensor::rand([n], (Kind::Float, Device::Cpu)) * 0.01;
        let (p, m, v) = (p0.copy(), m0.copy(), v0.copy());
        let step = Tensor::from(3.0f32);
        let scale = Tensor::from(2.5f32);
        let a = AdamWArgs {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.1,
            eps: 1e-8,
        };
        let grp = AdamWGroup {
            params: &p,
            grads: &g,
            exp_avg: &m,
            exp_avg_sq: &v,
            step: &step,
        };
        fused_adamw(&[grp], a, Some(&scale)).unwrap();
        // Reference in f64.
        let d = |t: &Tensor| t.to_kind(Kind::Double);
        let gs = d(&g0) / 2.5;
        let m_ref = d(&m0) * a.beta1 + &gs * (1.0 - a.beta1);
        let v_ref = d(&v0) * a.beta2 + gs.square() * (1.0 - a.beta2);
        let (bc1, bc2) = (1.0 - a.beta1.powi(3), 1.0 - a.beta2.powi(3));
        let p_ref = d(&p0) * (1.0 - a.lr * a.weight_decay)
            - (&m_ref / (v_ref.sqrt() / bc2.sqrt() + a.eps)) * (a.lr / bc1);
        let err = |x: &Tensor, y: &Tensor| (d(x) - y).abs().max().double_value(&[]);
        assert!(err(&m, &m_ref) < 1e-6, "exp_avg {}", err(&m, &m_ref));
        assert!(err(&v, &v_ref) < 1e-6, "exp_avg_sq {}", err(&v, &v_ref));
        assert!(err(&p, &p_ref) < 1e-5, "params {}", err(&p, &p_ref));
        assert!(err(&p, &d(&p0)) > 1e-3, "the step moved nothing");
        // The kernel leaves the unscaled gradient behind (as PyTorch's does).
        assert!(err(&g, &gs) < 1e-6);
    }

    #[test]
    fn profiler_writes_a_trace_with_the_operators_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.json");
        let prof = Profiler::start(false).unwrap();
        let a = {
            let _g = crate::model::rng_lock();
            Tensor::randn([64, 64], (Kind::Float, Device::Cpu))
        };
        let _ = a.matmul(&a).sum(Kind::Float);
        prof.stop(&path).unwrap();
        let trace: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let names: Vec<&str> = trace["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert!(
            names.contains(&"aten::mm"),
            "{:?}",
            &names[..names.len().min(20)]
        );
        // Nothing runs any more: stopping again is an error, not a crash.
        let again = Profiler { running: false };
        assert!(again.stop(&dir.path().join("t2.json")).is_err());
    }

    #[test]
    fn errors_come_back_as_messages_not_aborts() {
        // Flash attention has no CPU kernel: libtorch throws, the shim turns it into an error.
        let q = Tensor::zeros([8, 2, 16], (Kind::Float, Device::Cpu));
        let cu = Tensor::from_slice(&[0i32, 8]);
        assert!(!flash_varlen_supported(&q));
        let e = flash_varlen(&q, &q, &q, &cu, 8).unwrap_err().to_string();
        assert!(e.contains("varlen flash attention"), "{e}");
        // Pinning needs a CUDA runtime: without one it is an error (the batch upload then copies normally). Load
        // libtorch's CUDA backend first (`init_cuda`): another test loading it between the check and the pinning
        // would flip the answer.
        if !crate::init_cuda() {
            assert!(pin_memory(&q).is_err());
        } else {
            assert!(pin_memory(&q).unwrap().is_pinned(Device::Cuda(0)));
        }
        // Mismatched lengths in the fused optimizer.
        let p = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let g = Tensor::zeros([5], (Kind::Float, Device::Cpu));
        let s = Tensor::from(1.0f32);
        let grp = AdamWGroup {
            params: &p,
            grads: &g,
            exp_avg: &p,
            exp_avg_sq: &p,
            step: &s,
        };
        let args = AdamWArgs {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.0,
            eps: 1e-8,
        };
        assert!(fused_adamw(&[grp], args, None).is_err());
    }
}
