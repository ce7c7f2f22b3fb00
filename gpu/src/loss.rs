//! Next-token cross-entropy with ignored positions (padding), computed in fp32 whatever the model dtype.
//!
//! The trainer wants the *sum* over valid targets so that it can divide by the number of valid targets of the whole
//! global step (all micro-batches, all ranks): then 2 ranks × b sequences give exactly the gradient of 1 rank × 2b.
//!
//! Memory: autograd's `cross_entropy(logits.float())` keeps an fp32 `(N, V)` log-probability tensor alive until the
//! backward (4 bytes per logit, 4.2 GB for 8k tokens of the Llama 3 vocabulary) and makes a second fp32 copy of the
//! logits on the way. Here the loss and its gradient `softmax − onehot` are computed together, chunk by chunk, under
//! no-grad (fp32 only per chunk), and the gradient is kept in the logits' dtype (2 bytes per logit in bf16: the same
//! rounding autograd applies when it hands the gradient to bf16 logits). The trainer's path,
//! [`cross_entropy_sum_backward`], scales that gradient in the same kernel and hands it to the logits' graph directly
//! (`torch::autograd::backward(logits, G)` through the C++ shim): one rounding of `scale · (softmax − onehot)`, as
//! PyTorch's `(cross_entropy(logits.float()) * scale).backward()` does. [`cross_entropy_sum`] returns a loss that
//! carries the gradient through a surrogate `Σ logits·G − (Σ logits·G).detach()` (value exactly 0, backward
//! `upstream · G`), for callers that want `loss.backward()`.

use tch::{Kind, Tensor};

use crate::batch::IGNORE_INDEX;
use crate::error::Result;

/// fp32 elements per chunk (1 GiB of transient memory).
const CHUNK_ELEMS: i64 = 1 << 28;

/// The loss sum and, when `grad_scale` is given, its gradient times that scale, `(N, V)` in the logits' dtype.
///
/// Per chunk of rows: fp32 copy, `log_softmax`, the picked log-probabilities, then in place `exp_` (softmax),
/// `− onehot`, and one multiply by `valid · scale` that writes straight into the low-precision gradient (the cast
/// rides on the multiply). About 32 bytes of memory traffic per logit, against ~40 for autograd's
/// `cross_entropy(logits.float())` forward and backward.
fn loss_and_grad(
    logits: &Tensor,
    labels: &Tensor,
    grad_scale: Option<f64>,
) -> (Tensor, Option<Tensor>) {
    let v = *logits.size().last().expect("logits have a vocabulary axis");
    let flat = logits.reshape([-1, v]);
    let lab = labels.reshape([-1]);
    let n = flat.size()[0];
    let rows = (CHUNK_ELEMS / v).max(1);
    let _ng = tch::no_grad_guard();
    let mut total = Tensor::zeros([], (Kind::Float, logits.device()));
    let grad = grad_scale.map(|_| Tensor::empty([n, v], (logits.kind(), logits.device())));
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let y = lab.narrow(0, start, len);
        let valid = y.ne(IGNORE_INDEX).to_kind(Kind::Float).unsqueeze(1); // (len, 1)
        let safe = y.clamp_min(0).unsqueeze(1); // (len, 1)
        let mut lp = flat
            .narrow(0, start, len)
            .to_kind(Kind::Float)
            .log_softmax(-1, Kind::Float);
        let picked = lp.gather(1, &safe, false);
        total -= (picked * &valid).sum(Kind::Float);
        if let (Some(g), Some(scale)) = (&grad, grad_scale) {
            let mut p = lp.exp_(); // softmax, in place
            let _ = p.scatter_add_(1, &safe, &(-&valid)); // − onehot on valid rows
                                                          // padding rows get no gradient; the scale and the cast to the logits' dtype in the same kernel
            let _ = p.mul_out(&g.narrow(0, start, len), &(valid * scale));
        }
        start += len;
    }
    (total, grad)
}

/// Sum of `-log p(label)` over positions whose label is not [`IGNORE_INDEX`]. `logits` `(B, T, V)`, `labels` `(B, T)`.
/// The result is an fp32 scalar; when `logits` requires grad its backward is the exact cross-entropy gradient.
pub fn cross_entropy_sum(logits: &Tensor, labels: &Tensor) -> Tensor {
    if !logits.requires_grad() {
        return loss_and_grad(logits, labels, None).0;
    }
    let (total, grad) = loss_and_grad(logits, labels, Some(1.0));
    let grad = grad.expect("gradient requested");
    let v = *logits.size().last().expect("logits have a vocabulary axis");
    let flat = logits.reshape([-1, v]);
    let rows = (CHUNK_ELEMS / v).max(1);
    // split (not narrow): its backward is one cat, not a zero-filled (N, V) buffer per chunk.
    let mut s = Tensor::zeros([], (Kind::Float, logits.device()));
    for (x, g) in flat.split(rows, 0).iter().zip(grad.split(rows, 0)) {
        s += (x * g).sum(Kind::Float);
    }
    total + (&s - s.detach())
}

/// Forward and backward of `scale · cross_entropy_sum(logits, labels)` in one go: the gradient is computed with the
/// loss (see [`cross_entropy_sum`]'s chunks) and pushed into `logits`' graph directly
/// (`torch::autograd::backward(logits, grad)`), with no surrogate loss, no extra multiply and no concatenation in
/// the backward. Returns the unscaled loss sum (detached fp32 scalar, on the device).
pub fn cross_entropy_sum_backward(logits: &Tensor, labels: &Tensor, scale: f64) -> Result<Tensor> {
    let (total, grad) = loss_and_grad(logits, labels, Some(scale));
    let grad = grad.expect("gradient requested");
    crate::ops::backward_with_grad(logits, &grad.view_as(logits))?;
    Ok(total)
}

/// Mean over valid positions (0 when there are none).
pub fn cross_entropy_mean(logits: &Tensor, labels: &Tensor) -> Tensor {
    let n = labels.ne(IGNORE_INDEX).sum(Kind::Float).clamp_min(1.0);
    cross_entropy_sum(logits, labels) / n
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn ignored_positions_do_not_count() {
        let logits = {
            let _g = crate::model::rng_lock();
            Tensor::randn([1, 3, 5], (Kind::Float, Device::Cpu))
        };
        let labels = Tensor::from_slice(&[1i64, 4, IGNORE_INDEX]).view([1, 3]);
        let lp = logits.log_softmax(-1, Kind::Float);
        let want = -(lp.double_value(&[0, 0, 1]) + lp.double_value(&[0, 1, 4]));
        let got = cross_entropy_sum(&logits, &labels).double_value(&[]);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let mean = cross_entropy_mean(&logits, &labels).double_value(&[]);
        assert!((mean - want / 2.0).abs() < 1e-5);
        // Uniform logits over V classes give log V.
        let u = Tensor::zeros([2, 4, 8], (Kind::Float, Device::Cpu));
        let l = Tensor::zeros([2, 4], (Kind::Int64, Device::Cpu));
        assert!((cross_entropy_mean(&u, &l).double_value(&[]) - 8f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn gradient_matches_autograd_cross_entropy() {
        let base = {
            let _g = crate::model::rng_lock();
            Tensor::randn([2, 5, 7], (Kind::Float, Device::Cpu))
        };
        let labels = Tensor::from_slice(&[1i64, 4, IGNORE_INDEX, 6, 0, 2, 3, IGNORE_INDEX, 5, 1])
            .view([2, 5]);
        let a = base.detach().set_requires_grad(true);
        let la = cross_entropy_sum(&a, &labels);
        (&la * 0.37).backward();
        let b = base.detach().set_requires_grad(true);
        let lb = b.view([-1, 7]).cross_entropy_loss::<Tensor>(
            &labels.view([-1]),
            None,
            tch::Reduction::Sum,
            IGNORE_INDEX,
            0.0,
        );
        (&lb * 0.37).backward();
        assert!((la.double_value(&[]) - lb.double_value(&[])).abs() < 1e-5);
        let d = (a.grad() - b.grad()).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{d}");
        // The fused forward+backward gives the same loss and gradient (scale applied to the gradient only).
        let c = base.detach().set_requires_grad(true);
        let lc = cross_entropy_sum_backward(&(&c * 1.0), &labels, 0.37).unwrap();
        assert!((lc.double_value(&[]) - lb.double_value(&[])).abs() < 1e-5);
        let d = (c.grad() - b.grad()).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn bf16_gradient_is_the_rounded_fp32_gradient() {
        let base = {
            let _g = crate::model::rng_lock();
            Tensor::randn([3, 4, 11], (Kind::Float, Device::Cpu))
        };
        let labels =
            Tensor::from_slice(&[1i64, 4, 2, 6, 0, 2, 3, IGNORE_INDEX, 5, 1, 10, 9]).view([3, 4]);
        let x = base.to_kind(Kind::BFloat16).set_requires_grad(true);
        let l = cross_entropy_sum_backward(&(&x * 1.0), &labels, 0.25).unwrap();
        let xf = x.detach().to_kind(Kind::Float).set_requires_grad(true);
        let lf = xf.view([-1, 11]).cross_entropy_loss::<Tensor>(
            &labels.view([-1]),
            None,
            tch::Reduction::Sum,
            IGNORE_INDEX,
            0.0,
        );
        (&lf * 0.25).backward();
        assert!((l.double_value(&[]) - lf.double_value(&[])).abs() < 1e-4);
        assert_eq!(x.grad().kind(), Kind::BFloat16);
        let want = xf.grad().to_kind(Kind::BFloat16).to_kind(Kind::Float);
        let d = (x.grad().to_kind(Kind::Float) - want)
            .abs()
            .max()
            .double_value(&[]);
        assert!(d <= 1e-3 * 0.25, "{d}");
    }
}
