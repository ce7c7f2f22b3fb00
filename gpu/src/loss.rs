//! Next-token cross-entropy with ignored positions (padding), computed in fp32 whatever the model dtype.
//!
//! The trainer wants the *sum* over valid targets so that it can divide by the number of valid targets of the whole
//! global step (all micro-batches, all ranks): then 2 ranks × b sequences give exactly the gradient of 1 rank × 2b.

use tch::{Kind, Reduction, Tensor};

use crate::batch::IGNORE_INDEX;

/// Sum of `-log p(label)` over positions whose label is not [`IGNORE_INDEX`]. `logits` `(B, T, V)`, `labels` `(B, T)`.
pub fn cross_entropy_sum(logits: &Tensor, labels: &Tensor) -> Tensor {
    let v = *logits.size().last().expect("logits have a vocabulary axis");
    logits
        .view([-1, v])
        .to_kind(Kind::Float)
        .cross_entropy_loss::<Tensor>(&labels.view([-1]), None, Reduction::Sum, IGNORE_INDEX, 0.0)
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
        let logits = Tensor::randn([1, 3, 5], (Kind::Float, Device::Cpu));
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
}
