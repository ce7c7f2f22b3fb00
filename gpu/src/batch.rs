//! A micro-batch of packed sequences as tensors: inputs, labels (padding ignored) and, when some sequence holds more
//! than one document, per-position document ordinals for the block-diagonal attention mask.

use tch::{Device, Tensor};

use crate::error::{GpuError, Result};

/// Label value the loss skips.
pub const IGNORE_INDEX: i64 = -100;

/// One packed sequence as the trainer receives it: `seq_len + 1` tokens, trailing padding, document starts.
#[derive(Debug, Clone, Copy)]
pub struct SequenceRef<'a> {
    pub tokens: &'a [u32],
    pub padding: u32,
    pub doc_starts: &'a [u32],
    /// Input positions `[a, b)` whose targets are ignored (prompt tokens of instruction data).
    pub no_loss: &'a [[u32; 2]],
}

pub struct Batch {
    /// `(B, T)` int64.
    pub inputs: Tensor,
    /// `(B, T)` int64, [`IGNORE_INDEX`] where the target is padding.
    pub labels: Tensor,
    /// `(B, T)` int64 document ordinal per position; None when every sequence is a single document.
    pub doc_ids: Option<Tensor>,
    /// Host-side twin of `doc_ids`: per row, the lengths of its document segments (summing to T); None when every
    /// sequence is a single document.
    pub segments: Option<Vec<Vec<i64>>>,
    /// `segments` as cumulative lengths over the flattened `(B·T)` positions, int32 on the device:
    /// `0, len_0, len_0 + len_1, …, B·T` (rows concatenated; each row's segments sum to T). What varlen flash
    /// attention takes: one kernel launch per layer for every document of the micro-batch.
    pub cu_seqlens: Option<Tensor>,
    /// The longest document segment (0 when every sequence is a single document).
    pub max_seqlen: i64,
    /// Positions whose label counts in the loss.
    pub valid_tokens: i64,
}

impl Batch {
    pub fn new(rows: &[SequenceRef<'_>], device: Device) -> Result<Batch> {
        let Some(first) = rows.first() else {
            return Err(GpuError::Batch("empty micro-batch".into()));
        };
        let n = first.tokens.len();
        if n < 2 {
            return Err(GpuError::Batch(format!(
                "sequence of {n} tokens; need at least 2"
            )));
        }
        let t = n - 1;
        let mut inputs = Vec::with_capacity(rows.len() * t);
        let mut labels = Vec::with_capacity(rows.len() * t);
        let mut doc_ids = Vec::with_capacity(rows.len() * t);
        let mut segments = Vec::with_capacity(rows.len());
        let mut multi_doc = false;
        let mut valid = 0i64;
        for (r, row) in rows.iter().enumerate() {
            if row.tokens.len() != n {
                return Err(GpuError::Batch(format!(
                    "row {r} has {} tokens, row 0 has {n}: all sequences of a batch share seq_len",
                    row.tokens.len()
                )));
            }
            let pad = row.padding as usize;
            if pad > t {
                return Err(GpuError::Batch(format!(
                    "row {r}: padding {pad} exceeds seq_len {t}"
                )));
            }
            // Position p predicts tokens[p + 1]; targets inside the trailing padding or a prompt are ignored.
            for (p, trained) in trained_targets(row).into_iter().enumerate() {
                inputs.push(row.tokens[p] as i64);
                if trained {
                    labels.push(row.tokens[p + 1] as i64);
                    valid += 1;
                } else {
                    labels.push(IGNORE_INDEX);
                }
            }
            let starts: Vec<usize> = row
                .doc_starts
                .iter()
                .map(|&s| s as usize)
                .filter(|&s| s > 0 && s < t)
                .collect();
            if !starts.is_empty() {
                multi_doc = true;
            }
            let mut lens = Vec::with_capacity(starts.len() + 1);
            let mut prev = 0usize;
            for &s in &starts {
                if s > prev {
                    lens.push((s - prev) as i64);
                    prev = s;
                }
            }
            lens.push((t - prev) as i64);
            segments.push(lens);
            let mut doc = 0i64;
            let mut next = starts.iter().peekable();
            for p in 0..t {
                while next.peek().is_some_and(|&&s| s <= p) {
                    next.next();
                    doc += 1;
                }
                doc_ids.push(doc);
            }
        }
        let b = rows.len() as i64;
        let bt = b * t as i64;
        // One host buffer, one host-to-device copy: inputs | labels | doc_ids | cumulative segment lengths. On CUDA
        // the buffer is pinned and the copy asynchronous, so building the next micro-batch never waits for the GPU
        // to drain its queue (a pageable copy synchronises the stream).
        let (cu, max_seqlen) = if multi_doc {
            let mut cu = Vec::with_capacity(segments.iter().map(Vec::len).sum::<usize>() + 1);
            let mut acc = 0i64;
            cu.push(0);
            for &len in segments.iter().flatten() {
                acc += len;
                cu.push(acc);
            }
            let max = segments.iter().flatten().copied().max().unwrap_or(0);
            (cu, max)
        } else {
            (Vec::new(), 0)
        };
        let mut host = inputs;
        host.extend_from_slice(&labels);
        if multi_doc {
            host.extend_from_slice(&doc_ids);
            host.extend_from_slice(&cu);
        }
        let all = upload(&Tensor::from_slice(&host), device);
        let part = |i: i64| all.narrow(0, i * bt, bt).view([b, t as i64]);
        let cu_seqlens = multi_doc.then(|| {
            all.narrow(0, 3 * bt, cu.len() as i64)
                .to_kind(tch::Kind::Int)
        });
        Ok(Batch {
            inputs: part(0),
            labels: part(1),
            doc_ids: multi_doc.then(|| part(2)),
            segments: multi_doc.then_some(segments),
            cu_seqlens,
            max_seqlen,
            valid_tokens: valid,
        })
    }

    pub fn size(&self) -> (i64, i64) {
        self.inputs.size2().expect("(B, T)")
    }
}

/// Host tensor → `device`: asynchronous from pinned memory on CUDA (libtorch's caching host allocator keeps the
/// pinned block alive until the copy has run), a plain copy otherwise or if pinning fails.
fn upload(host: &Tensor, device: Device) -> Tensor {
    if !device.is_cuda() {
        return host.shallow_clone();
    }
    match crate::ops::pin_memory(host) {
        Ok(pinned) => pinned.to_device_(device, pinned.kind(), true, false),
        Err(_) => host.to_device(device),
    }
}

/// Non-padding targets of one sequence (what [`Batch::valid_tokens`] counts), without building tensors.
pub fn valid_targets(row: &SequenceRef<'_>) -> i64 {
    trained_targets(row).into_iter().filter(|&x| x).count() as i64
}

/// Per input position: whether its target is trained on (not in the trailing padding, not in a `no_loss` range).
fn trained_targets(row: &SequenceRef<'_>) -> Vec<bool> {
    let t = row.tokens.len().saturating_sub(1);
    let live = t.saturating_sub(row.padding as usize);
    let mut trained: Vec<bool> = (0..t).map(|p| p < live).collect();
    for &[a, b] in row.no_loss {
        let (a, b) = ((a as usize).min(t), (b as usize).min(t));
        trained[a..b.max(a)].iter_mut().for_each(|x| *x = false);
    }
    trained
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_shift_and_ignore_padding_and_doc_ids_follow_starts() {
        let toks = [1u32, 2, 3, 4, 5, 0, 0];
        let row = SequenceRef {
            tokens: &toks,
            padding: 2,
            doc_starts: &[0, 3],
            no_loss: &[],
        };
        let b = Batch::new(&[row], Device::Cpu).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(b.inputs.view([-1])).unwrap(),
            vec![1, 2, 3, 4, 5, 0]
        );
        assert_eq!(
            Vec::<i64>::try_from(b.labels.view([-1])).unwrap(),
            vec![2, 3, 4, 5, -100, -100]
        );
        assert_eq!(
            Vec::<i64>::try_from(b.doc_ids.unwrap().view([-1])).unwrap(),
            vec![0, 0, 0, 1, 1, 1]
        );
        assert_eq!(b.valid_tokens, 4);
        assert_eq!(
            Vec::<i32>::try_from(b.cu_seqlens.as_ref().unwrap()).unwrap(),
            vec![0, 3, 6]
        );
        assert_eq!(b.max_seqlen, 3);
        assert_eq!(valid_targets(&row), 4);
        let single = SequenceRef {
            tokens: &toks,
            padding: 0,
            doc_starts: &[0],
            no_loss: &[],
        };
        let one = Batch::new(&[single], Device::Cpu).unwrap();
        assert!(one.doc_ids.is_none() && one.cu_seqlens.is_none());
        // Rows concatenate: the second row's single document spans positions 6..12 of the flattened batch.
        let two = Batch::new(&[row, single], Device::Cpu).unwrap();
        assert_eq!(
            Vec::<i32>::try_from(two.cu_seqlens.as_ref().unwrap()).unwrap(),
            vec![0, 3, 6, 12]
        );
        assert_eq!(two.max_seqlen, 6);
        assert_eq!(
            Vec::<i64>::try_from(two.labels.view([-1])).unwrap(),
            vec![2, 3, 4, 5, -100, -100, 2, 3, 4, 5, 0, 0]
        );
        let short = SequenceRef {
            tokens: &toks[..3],
            padding: 0,
            doc_starts: &[0],
            no_loss: &[],
        };
        assert!(Batch::new(&[single, short], Device::Cpu).is_err());
    }
}
