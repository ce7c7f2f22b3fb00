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
}

pub struct Batch {
    /// `(B, T)` int64.
    pub inputs: Tensor,
    /// `(B, T)` int64, [`IGNORE_INDEX`] where the target is padding.
    pub labels: Tensor,
    /// `(B, T)` int64 document ordinal per position; None when every sequence is a single document.
    pub doc_ids: Option<Tensor>,
    /// Host-side twin of `doc_ids`: per row, the lengths of its document segments (summing to T); None when every
    /// sequence is a single document. The model runs one flash-attention call per segment instead of a T×T mask.
    pub segments: Option<Vec<Vec<i64>>>,
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
            // Position p predicts tokens[p + 1]; targets inside the trailing padding are ignored.
            let first_ignored = t - pad;
            for p in 0..t {
                inputs.push(row.tokens[p] as i64);
                if p < first_ignored {
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
        let to = |v: &[i64]| Tensor::from_slice(v).view([b, t as i64]).to_device(device);
        Ok(Batch {
            inputs: to(&inputs),
            labels: to(&labels),
            doc_ids: multi_doc.then(|| to(&doc_ids)),
            segments: multi_doc.then_some(segments),
            valid_tokens: valid,
        })
    }

    pub fn size(&self) -> (i64, i64) {
        self.inputs.size2().expect("(B, T)")
    }
}

/// Non-padding targets of one sequence (what [`Batch::valid_tokens`] counts), without building tensors.
pub fn valid_targets(row: &SequenceRef<'_>) -> i64 {
    row.tokens
        .len()
        .saturating_sub(1)
        .saturating_sub(row.padding as usize) as i64
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
        assert_eq!(valid_targets(&row), 4);
        let single = SequenceRef {
            tokens: &toks,
            padding: 0,
            doc_starts: &[0],
        };
        assert!(Batch::new(&[single], Device::Cpu)
            .unwrap()
            .doc_ids
            .is_none());
        let short = SequenceRef {
            tokens: &toks[..3],
            padding: 0,
            doc_starts: &[0],
        };
        assert!(Batch::new(&[single, short], Device::Cpu).is_err());
    }
}
