//! Collectives between data-parallel ranks: the [`Collective`] trait and its in-process implementation for CPU
//! ranks (threads of one process), here; between CPU processes `tcp.rs`; NCCL in `nccl.rs` behind the `cuda`
//! feature, watched by `watchdog.rs`.
//!
//! The in-process all-reduce is deterministic: every rank deposits its buffer, then sums the deposits in rank order,
//! so the result does not depend on thread timing, and 2 ranks × b sequences equal 1 rank × 2b up to float rounding.
//! A rank that fails calls [`Collective::abort`] (or panics): its peers' pending and future calls return an error
//! instead of waiting forever.

#[cfg(feature = "cuda")]
mod nccl;
mod tcp;
pub mod watchdog;

#[cfg(feature = "cuda")]
pub use nccl::{NcclCollective, NcclUniqueId};
pub use tcp::TcpCollective;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::error::{GpuError, Result};

pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// In place: `buf = mean over ranks of buf` (same shape and dtype on every rank).
    fn all_reduce_mean(&self, buf: &mut Tensor) -> Result<()>;
    /// In place: `buf = sum over ranks of buf`.
    fn all_reduce_sum(&self, buf: &mut Tensor) -> Result<()>;
    /// In place: every rank receives `root`'s `buf`.
    fn broadcast(&self, buf: &mut Tensor, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Tells the peers this rank will not take part any more (after an error).
    fn abort(&self) {}

    /// Reduce-scatter (mean): `input` holds `world` equal chunks; `output` (one chunk long, same dtype) receives the
    /// mean over ranks of chunk `rank`. The default all-reduces a copy and keeps this rank's chunk, so every element
    /// gets exactly the arithmetic of [`all_reduce_mean`](Self::all_reduce_mean): a sharded optimizer sees the same
    /// gradient bits as a replicated one. NCCL overrides it with `ncclReduceScatter`.
    fn reduce_scatter_mean(&self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        let c = output.numel() as i64;
        check_chunks(self.rank(), self.world_size(), input, output)?;
        let _ng = tch::no_grad_guard();
        let mut all = input.detach().copy();
        self.all_reduce_mean(&mut all)?;
        output.copy_(
            &all.narrow(0, self.rank() as i64 * c, c)
                .view(output.size().as_slice()),
        );
        Ok(())
    }

    /// All-gather: `output` (`world` chunks of `input`'s length, same dtype) receives every rank's `input` in rank
    /// order, bit for bit. The default is one broadcast per rank; NCCL overrides it with `ncclAllGather`.
    fn all_gather(&self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        let c = input.numel() as i64;
        check_chunks(self.rank(), self.world_size(), output, input)?;
        let _ng = tch::no_grad_guard();
        for root in 0..self.world_size() {
            let mut chunk = output.narrow(0, root as i64 * c, c);
            if root == self.rank() {
                chunk.copy_(&input.reshape([-1]));
            }
            // Broadcast needs a contiguous buffer: a narrow of a 1-D tensor is one.
            self.broadcast(&mut chunk, root)?;
        }
        Ok(())
    }

    /// Sums a few host scalars (token counts, losses) across ranks.
    fn all_reduce_sum_f64(&self, vals: &mut [f64], device: Device) -> Result<()> {
        let mut t = Tensor::from_slice(vals).to_device(device);
        self.all_reduce_sum(&mut t)?;
        let back = Vec::<f64>::try_from(t.to_device(Device::Cpu)).map_err(GpuError::from)?;
        vals.copy_from_slice(&back);
        Ok(())
    }
}

/// `whole` must be 1-D, `world` times as long as `part`, with the same dtype and device.
pub(crate) fn check_chunks(rank: usize, world: usize, whole: &Tensor, part: &Tensor) -> Result<()> {
    if whole.dim() != 1
        || whole.numel() != world * part.numel()
        || whole.kind() != part.kind()
        || whole.device() != part.device()
    {
        return Err(GpuError::Collective {
            rank,
            message: format!(
                "scatter/gather buffers: {:?} {:?} on {:?} is not {world} × {:?} {:?} on {:?} (1-D)",
                whole.size(),
                whole.kind(),
                whole.device(),
                part.size(),
                part.kind(),
                part.device()
            ),
        });
    }
    Ok(())
}

/// World size 1: every collective is the identity.
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&self, _buf: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum(&self, _buf: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut Tensor, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

struct BarrierState {
    arrived: usize,
    generation: u64,
}

struct Shared {
    world: usize,
    /// One deposit per rank: the flat contents as f64 (exact for f32/bf16 inputs).
    slots: Mutex<Vec<Vec<f64>>>,
    barrier: Mutex<BarrierState>,
    cv: Condvar,
    aborted: AtomicBool,
}

impl Shared {
    fn wait(&self, rank: usize) -> Result<()> {
        let err = || GpuError::Collective {
            rank,
            message: "a peer rank aborted".into(),
        };
        let mut g = self.barrier.lock().unwrap_or_else(|e| e.into_inner());
        if self.aborted.load(Ordering::SeqCst) {
            return Err(err());
        }
        let gen = g.generation;
        g.arrived += 1;
        if g.arrived == self.world {
            g.arrived = 0;
            g.generation += 1;
            self.cv.notify_all();
            return Ok(());
        }
        while g.generation == gen {
            let (ng, _) = self
                .cv
                .wait_timeout(g, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner());
            g = ng;
            if self.aborted.load(Ordering::SeqCst) {
                return Err(err());
            }
        }
        Ok(())
    }
}

/// One rank of an in-process group. Create the group with [`InProcessCollective::group`] and move each member into
/// its rank's thread.
pub struct InProcessCollective {
    rank: usize,
    shared: Arc<Shared>,
}

impl InProcessCollective {
    pub fn group(world: usize) -> Vec<InProcessCollective> {
        let shared = Arc::new(Shared {
            world,
            slots: Mutex::new(vec![Vec::new(); world]),
            barrier: Mutex::new(BarrierState {
                arrived: 0,
                generation: 0,
            }),
            cv: Condvar::new(),
            aborted: AtomicBool::new(false),
        });
        (0..world)
            .map(|rank| InProcessCollective {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn deposit(&self, buf: &Tensor) -> Result<()> {
        let host = buf
            .detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Double)
            .reshape([-1]);
        let v = Vec::<f64>::try_from(host)?;
        self.shared.slots.lock().unwrap_or_else(|e| e.into_inner())[self.rank] = v;
        Ok(())
    }

    fn reduce(&self, buf: &mut Tensor, scale: f64) -> Result<()> {
        if self.shared.world == 1 {
            if scale != 1.0 {
                let _ = buf.g_mul_scalar_(scale);
            }
            return Ok(());
        }
        self.deposit(buf)?;
        self.shared.wait(self.rank)?;
        let sum = {
            let slots = self.shared.slots.lock().unwrap_or_else(|e| e.into_inner());
            let n = slots[0].len();
            if slots.iter().any(|s| s.len() != n) {
                self.abort();
                return Err(GpuError::Collective {
                    rank: self.rank,
                    message: "buffers differ in length".into(),
                });
            }
            // Rank order: deterministic for any thread timing.
            let mut acc = slots[0].clone();
            for s in &slots[1..] {
                for (a, &x) in acc.iter_mut().zip(s) {
                    *a += x;
                }
            }
            acc
        };
        // Nobody may overwrite a slot before every rank has read them all.
        self.shared.wait(self.rank)?;
        let t = Tensor::from_slice(&sum)
            .view(buf.size().as_slice())
            .to_device(buf.device())
            .to_kind(buf.kind());
        let _ng = tch::no_grad_guard();
        buf.copy_(&t);
        if scale != 1.0 {
            let _ = buf.g_mul_scalar_(scale);
        }
        Ok(())
    }
}

impl Collective for InProcessCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_mean(&self, buf: &mut Tensor) -> Result<()> {
        self.reduce(buf, 1.0 / self.shared.world as f64)
    }

    fn all_reduce_sum(&self, buf: &mut Tensor) -> Result<()> {
        self.reduce(buf, 1.0)
    }

    fn broadcast(&self, buf: &mut Tensor, root: usize) -> Result<()> {
        if self.shared.world == 1 {
            return Ok(());
        }
        if self.rank == root {
            self.deposit(buf)?;
        }
        self.shared.wait(self.rank)?;
        if self.rank != root {
            let v = self.shared.slots.lock().unwrap_or_else(|e| e.into_inner())[root].clone();
            let t = Tensor::from_slice(&v)
                .view(buf.size().as_slice())
                .to_device(buf.device())
                .to_kind(buf.kind());
            let _ng = tch::no_grad_guard();
            buf.copy_(&t);
        }
        self.shared.wait(self.rank)
    }

    fn barrier(&self) -> Result<()> {
        self.shared.wait(self.rank)
    }

    fn abort(&self) {
        self.shared.aborted.store(true, Ordering::SeqCst);
        self.shared.cv.notify_all();
    }
}

impl Drop for InProcessCollective {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_sum_broadcast_across_threads() {
        let handles: Vec<_> = InProcessCollective::group(3)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let r = c.rank() as f32;
                    let mut t = Tensor::from_slice(&[r, 2.0 * r]);
                    c.all_reduce_mean(&mut t).unwrap();
                    let mut s = Tensor::from_slice(&[r + 1.0]);
                    c.all_reduce_sum(&mut s).unwrap();
                    let mut b = Tensor::from_slice(&[r * 10.0]);
                    c.broadcast(&mut b, 2).unwrap();
                    let mut f = [c.rank() as f64, 1.0];
                    c.all_reduce_sum_f64(&mut f, Device::Cpu).unwrap();
                    (
                        Vec::<f32>::try_from(t).unwrap(),
                        s.double_value(&[0]),
                        b.double_value(&[0]),
                        f,
                    )
                })
            })
            .collect();
        for h in handles {
            let (m, s, b, f) = h.join().unwrap();
            assert_eq!(m, vec![1.0, 2.0]);
            assert_eq!(s, 6.0);
            assert_eq!(b, 20.0);
            assert_eq!(f, [3.0, 3.0]);
        }
    }

    #[test]
    fn abort_releases_waiting_peers() {
        let mut g = InProcessCollective::group(2);
        let c1 = g.pop().unwrap();
        let c0 = g.pop().unwrap();
        let h = std::thread::spawn(move || c0.barrier());
        std::thread::sleep(Duration::from_millis(50));
        c1.abort();
        assert!(h.join().unwrap().is_err());
    }

    /// Reduce-scatter gives each rank its chunk of the all-reduce's result bit for bit; all-gather returns every
    /// rank's bytes (including a negative zero) in rank order.
    #[test]
    fn reduce_scatter_and_all_gather_match_all_reduce() {
        let handles: Vec<_> = InProcessCollective::group(3)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let r = c.rank();
                    let x = {
                        let _g = crate::model::rng_lock();
                        tch::manual_seed(r as i64);
                        Tensor::randn([12], (Kind::Float, Device::Cpu))
                    };
                    let mut all = x.copy();
                    c.all_reduce_mean(&mut all).unwrap();
                    let mut mine = Tensor::zeros([4], (Kind::Float, Device::Cpu));
                    c.reduce_scatter_mean(&x, &mut mine).unwrap();
                    assert!(mine.equal(&all.narrow(0, 4 * r as i64, 4)));
                    let inp = Tensor::from_slice(&[r as f32, -0.0, 1.5 * r as f32]);
                    let mut out = Tensor::zeros([9], (Kind::Float, Device::Cpu));
                    c.all_gather(&inp, &mut out).unwrap();
                    let bad = Tensor::zeros([5], (Kind::Float, Device::Cpu));
                    let e = c
                        .reduce_scatter_mean(&bad, &mut mine)
                        .unwrap_err()
                        .to_string();
                    assert!(e.contains("3 ×"), "{e}");
                    Vec::<f32>::try_from(out).unwrap()
                })
            })
            .collect();
        for h in handles {
            let out = h.join().unwrap();
            let want = [0.0f32, -0.0, 0.0, 1.0, -0.0, 1.5, 2.0, -0.0, 3.0];
            assert_eq!(
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
