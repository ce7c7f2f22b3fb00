//! NCCL collectives through `cudarc` (feature `cuda`), on the raw device pointers of tch tensors.
//!
//! * Ordering: libtorch launches its kernels on the legacy default stream (tch sets no stream), so every NCCL call
//!   here is enqueued on that same stream (a null `cudaStream_t`): the all-reduce starts after the backward kernels
//!   and the optimizer kernels start after it, with no host synchronisation.
//! * Buckets: a flat buffer is reduced in buckets of [`BUCKET_ELEMS`] elements inside one NCCL group, which keeps
//!   each call within NCCL's sweet spot without extra copies.
//! * Rendezvous: rank 0 creates the unique id and hands it out at `MASTER_ADDR:MASTER_PORT` (torchrun
//!   conventions) through the CPU collective's handshake ([`crate::collective::tcp::rendezvous`]: ranks introduce themselves,
//!   foreign or duplicate ranks are refused, bounded by `LEXFLOW_RENDEZVOUS_TIMEOUT_S`). Threads of one process can share an id directly.
//! * cudarc looks for `libnccl.so` (not `libnccl.so.2`): scripts/setup.sh links it in the torch wheel's NCCL
//!   directory, which is on the binaries' run path (actors/build.rs); without it the first NCCL call is an error
//!   saying so (cudarc itself would panic).
//! * Watchdog: a CUDA event recorded after each collective and NCCL's asynchronous error state are polled by a
//!   thread per communicator; a dead or stuck peer stops the process with a clear message instead of a silent hang
//!   ([`crate::collective::watchdog`]).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::nccl::{result, sys};
use tch::{Device, Kind, Tensor};

use crate::collective::watchdog::{verdict, Probe, WatchdogConfig};
use crate::collective::{check_chunks, Collective};
use crate::error::{GpuError, Result};

/// Elements per all-reduce call (100 MB of fp32).
pub const BUCKET_ELEMS: i64 = 25 << 20;

/// The 128-byte NCCL unique id shared by all ranks of a communicator.
#[derive(Clone, Copy)]
pub struct NcclUniqueId(sys::ncclUniqueId);

/// Checks that the NCCL library loads before cudarc loads it (on first use; it panics when it finds none), so that a
/// missing library is an error that says what to do. cudarc looks for `libnccl.so` and a few versioned names, not
/// `libnccl.so.2`, the one file the torch wheel's `nvidia-nccl` package has. The same names, the same `dlopen`
/// search from the same executable: when one loads here, cudarc finds it too.
fn nccl_library(rank: usize) -> Result<()> {
    load_first(rank, &cudarc::get_lib_name_candidates("nccl"))
}

fn load_first(rank: usize, names: &[String]) -> Result<()> {
    extern "C" {
        fn dlopen(
            filename: *const std::ffi::c_char,
            flag: std::ffi::c_int,
        ) -> *mut std::ffi::c_void;
    }
    const RTLD_NOW: std::ffi::c_int = 2;
    for name in names {
        let Ok(c) = std::ffi::CString::new(name.as_str()) else {
            continue;
        };
        // SAFETY: dlopen with a valid NUL-terminated name; the handle is kept (cudarc holds the library for the
        // process's lifetime as well).
        if !unsafe { dlopen(c.as_ptr(), RTLD_NOW) }.is_null() {
            return Ok(());
        }
    }
    Err(GpuError::Collective {
        rank,
        message: format!(
            "cannot load NCCL: none of {} is on the library path (the torch wheel's nvidia-nccl package ships only \
             `libnccl.so.2`, a name cudarc does not try): run scripts/setup.sh, which links \
             site-packages/nvidia/nccl/lib/libnccl.so to it, or put such a symlink in a directory on LD_LIBRARY_PATH",
            names[..names.len().min(2)].join(", ")
        ),
    })
}

impl NcclUniqueId {
    pub fn new() -> Result<Self> {
        nccl_library(0)?;
        result::get_uniqueid()
            .map(NcclUniqueId)
            .map_err(|e| nccl_err(0, "ncclGetUniqueId", e))
    }

    fn to_bytes(self) -> [u8; 128] {
        self.0.internal.map(|c| c as u8)
    }

    fn from_bytes(b: [u8; 128]) -> Self {
        NcclUniqueId(sys::ncclUniqueId {
            internal: b.map(|c| c as ::core::ffi::c_char),
        })
    }

    /// Rank 0 creates the id and hands it to the `world - 1` others through the TCP rendezvous of the CPU
    /// collective ([`crate::collective::tcp::rendezvous`]): each rank introduces itself (rank, world size) and is acknowledged,
    /// a foreign or duplicate rank is refused by name, and every rank gives up after `timeout` (naming the missing
    /// ranks) instead of waiting forever for a rank that never starts.
    pub fn exchange_tcp(
        rank: usize,
        world: usize,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Self> {
        let id = if rank == 0 { Some(Self::new()?) } else { None };
        let mine = id.map(|i| i.to_bytes().to_vec()).unwrap_or_default();
        let (_, got) = crate::collective::tcp::rendezvous(rank, world, addr, timeout, &mine)?;
        let bytes: [u8; 128] = got.as_slice().try_into().map_err(|_| GpuError::Collective {
            rank,
            message: format!(
                "rank 0 at {addr} sent {} bytes where the 128-byte NCCL unique id belongs (another program on \
                 MASTER_PORT, or a CPU rank 0?)",
                got.len()
            ),
        })?;
        Ok(Self::from_bytes(bytes))
    }
}

fn nccl_err(rank: usize, what: &str, e: result::NcclError) -> GpuError {
    GpuError::Collective {
        rank,
        message: format!("{what} failed: {:?}", e.0),
    }
}

fn dtype(kind: Kind, rank: usize) -> Result<sys::ncclDataType_t> {
    Ok(match kind {
        Kind::Float => sys::ncclDataType_t::ncclFloat32,
        Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
        Kind::Half => sys::ncclDataType_t::ncclFloat16,
        Kind::Double => sys::ncclDataType_t::ncclFloat64,
        Kind::Int64 => sys::ncclDataType_t::ncclInt64,
        Kind::Int => sys::ncclDataType_t::ncclInt32,
        k => {
            return Err(GpuError::Collective {
                rank,
                message: format!("no NCCL type for {k:?}"),
            })
        }
    })
}

/// The oldest collective not known to be finished.
struct Inflight {
    op: &'static str,
    since: Instant,
}

/// What the watchdog thread shares with the communicator's owner.
struct Watch {
    /// Recorded on the default stream after each collective.
    event: cudarc::driver::CudaEvent,
    stream: Arc<cudarc::driver::CudaStream>,
    pending: Mutex<Option<Inflight>>,
    stop: AtomicBool,
    /// Set by the thread when it no longer touches the communicator.
    exited: AtomicBool,
}

impl Watch {
    /// Stops the thread and waits until it no longer touches the communicator (at most one poll slice).
    fn halt(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let t = Instant::now();
        while !self.exited.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Watch {
    fn probe(&self) -> Probe {
        let mut g = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = g.as_ref() else {
            return Probe::Idle;
        };
        match self.event.try_is_complete() {
            Ok(true) => {
                *g = None;
                Probe::Idle
            }
            Ok(false) => Probe::Pending {
                op: p.op,
                age: p.since.elapsed(),
            },
            Err(e) => Probe::CudaError(format!("{e:?}")),
        }
    }
}

/// The communicator handle, for the watchdog thread (NCCL allows querying its error state from another thread).
struct CommHandle(sys::ncclComm_t);
unsafe impl Send for CommHandle {}

/// One rank of an NCCL communicator, bound to `cuda:ordinal`.
pub struct NcclCollective {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    ordinal: usize,
    aborted: std::sync::atomic::AtomicBool,
    watch: Option<(Arc<Watch>, std::thread::JoinHandle<()>)>,
    _ctx: std::sync::Arc<cudarc::driver::CudaContext>,
}

// The communicator handle is used by the one thread that owns this value.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Joins the communicator (blocks until all `world` ranks have called this with the same id).
    pub fn new(id: NcclUniqueId, rank: usize, world: usize, ordinal: usize) -> Result<Self> {
        crate::init_cuda();
        nccl_library(rank)?;
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| GpuError::Collective {
            rank,
            message: format!("CUDA context for device {ordinal}: {e:?}"),
        })?;
        let cfg = WatchdogConfig::from_env().map_err(|e| GpuError::Collective {
            rank,
            message: e.to_string(),
        })?;
        let mut me = NcclCollective {
            comm: std::ptr::null_mut(),
            rank,
            world,
            ordinal,
            aborted: Default::default(),
            watch: None,
            _ctx: ctx,
        };
        me.bind()?;
        let mut comm = std::mem::MaybeUninit::uninit();
        unsafe { result::comm_init_rank(comm.as_mut_ptr(), world as i32, id.0, rank as i32) }
            .map_err(|e| nccl_err(rank, "ncclCommInitRank", e))?;
        me.comm = unsafe { comm.assume_init() };
        me.start_watchdog(cfg)?;
        Ok(me)
    }

    fn start_watchdog(&mut self, cfg: WatchdogConfig) -> Result<()> {
        let rank = self.rank;
        let cuda = |what: &str, e: cudarc::driver::DriverError| GpuError::Collective {
            rank,
            message: format!("watchdog {what}: {e:?}"),
        };
        let event = self._ctx.new_event(None).map_err(|e| cuda("event", e))?;
        let watch = Arc::new(Watch {
            event,
            stream: self._ctx.default_stream(),
            pending: Mutex::new(None),
            stop: AtomicBool::new(false),
            exited: AtomicBool::new(false),
        });
        let w = watch.clone();
        let ctx = self._ctx.clone();
        let comm = CommHandle(self.comm);
        let handle = std::thread::Builder::new()
            .name(format!("nccl-watchdog.rank{rank}"))
            .spawn(move || {
                let comm = comm;
                let _ = ctx.bind_to_thread();
                let slice = Duration::from_millis(100);
                let mut last = Instant::now();
                while !w.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(slice);
                    if last.elapsed() < cfg.poll {
                        continue;
                    }
                    last = Instant::now();
                    let mut state = sys::ncclResult_t::ncclSuccess;
                    let r = unsafe { sys::ncclCommGetAsyncError(comm.0, &mut state) };
                    let async_error = match (r, state) {
                        (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclSuccess)
                        | (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclInProgress) => {
                            None
                        }
                        (sys::ncclResult_t::ncclSuccess, s) => Some(format!("{s:?}")),
                        (r, _) => Some(format!("ncclCommGetAsyncError: {r:?}")),
                    };
                    if let Some(msg) = verdict(rank, &w.probe(), async_error.as_deref(), &cfg) {
                        tracing::error!("{msg}");
                        eprintln!("lexflow: error: {msg}");
                        let _ = std::io::stderr().flush();
                        // Not `exit`: its handlers would wait for the GPU work that never finishes.
                        extern "C" {
                            fn _exit(code: std::ffi::c_int) -> !;
                        }
                        unsafe { _exit(75) }
                    }
                }
                w.exited.store(true, Ordering::SeqCst);
            })
            .map_err(|e| GpuError::Collective {
                rank,
                message: format!("cannot start the NCCL watchdog thread: {e}"),
            })?;
        self.watch = Some((watch, handle));
        Ok(())
    }

    /// After enqueueing a collective: the watchdog follows it through the event.
    fn enqueued(&self, op: &'static str) {
        let Some((w, _)) = &self.watch else { return };
        let mut g = w.pending.lock().unwrap_or_else(|e| e.into_inner());
        // Keep the time of the oldest unfinished one.
        let since = match g.as_ref() {
            Some(p) if !matches!(w.event.try_is_complete(), Ok(true)) => p.since,
            _ => Instant::now(),
        };
        if w.event.record(&w.stream).is_ok() {
            *g = Some(Inflight { op, since });
        }
    }

    /// From torchrun-style environment: `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (default 0), `MASTER_ADDR`, `MASTER_PORT`,
    /// `LEXFLOW_RENDEZVOUS_TIMEOUT_S` ([`crate::collective::tcp::RendezvousEnv`]).
    pub fn from_env() -> Result<Self> {
        let env = crate::collective::tcp::RendezvousEnv::from_env()?;
        let local = match std::env::var("LOCAL_RANK") {
            Err(_) => 0,
            Ok(v) => v
                .trim()
                .parse::<usize>()
                .map_err(|_| GpuError::Collective {
                    rank: env.rank,
                    message: format!("LOCAL_RANK={v} is not a number"),
                })?,
        };
        let id = NcclUniqueId::exchange_tcp(env.rank, env.world, env.addr, env.timeout)?;
        Self::new(id, env.rank, env.world, local)
    }

    /// NCCL uses the calling thread's current device; libtorch's device guards restore theirs, so set ours each time.
    fn bind(&self) -> Result<()> {
        self._ctx
            .bind_to_thread()
            .map_err(|e| GpuError::Collective {
                rank: self.rank,
                message: format!("bind device: {e:?}"),
            })
    }

    fn check(&self, buf: &Tensor) -> Result<()> {
        if buf.device() != Device::Cuda(self.ordinal) || !buf.is_contiguous() {
            return Err(GpuError::Collective {
                rank: self.rank,
                message: format!(
                    "buffer must be contiguous on cuda:{}, is {:?}",
                    self.ordinal,
                    buf.device()
                ),
            });
        }
        Ok(())
    }

    fn all_reduce(&self, buf: &mut Tensor, op: sys::ncclRedOp_t) -> Result<()> {
        self.check(buf)?;
        self.bind()?;
        let dt = dtype(buf.kind(), self.rank)?;
        let elt = buf.kind().elt_size_in_bytes();
        let n = buf.numel() as i64;
        let base = buf.data_ptr() as *mut u8;
        result::group_start().map_err(|e| nccl_err(self.rank, "ncclGroupStart", e))?;
        let mut off = 0i64;
        while off < n {
            let len = BUCKET_ELEMS.min(n - off);
            let p = unsafe { base.add(off as usize * elt) } as *mut ::core::ffi::c_void;
            let r = unsafe {
                result::all_reduce(p, p, len as usize, dt, op, self.comm, std::ptr::null_mut())
            };
            if let Err(e) = r {
                let _ = result::group_end();
                return Err(nccl_err(self.rank, "ncclAllReduce", e));
            }
            off += len;
        }
        result::group_end().map_err(|e| nccl_err(self.rank, "ncclGroupEnd", e))?;
        self.enqueued("ncclAllReduce");
        Ok(())
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&self, buf: &mut Tensor) -> Result<()> {
        self.all_reduce(buf, sys::ncclRedOp_t::ncclAvg)
    }

    fn all_reduce_sum(&self, buf: &mut Tensor) -> Result<()> {
        self.all_reduce(buf, sys::ncclRedOp_t::ncclSum)
    }

    fn broadcast(&self, buf: &mut Tensor, root: usize) -> Result<()> {
        self.check(buf)?;
        self.bind()?;
        let dt = dtype(buf.kind(), self.rank)?;
        let p = buf.data_ptr();
        unsafe {
            result::broadcast(
                p,
                p,
                buf.numel(),
                dt,
                root as i32,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_err(self.rank, "ncclBroadcast", e))?;
        self.enqueued("ncclBroadcast");
        Ok(())
    }

    fn reduce_scatter_mean(&self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        check_chunks(self.rank, self.world, input, output)?;
        self.check(input)?;
        self.check(output)?;
        self.bind()?;
        let dt = dtype(output.kind(), self.rank)?;
        unsafe {
            result::reduce_scatter(
                input.data_ptr(),
                output.data_ptr(),
                output.numel(),
                dt,
                sys::ncclRedOp_t::ncclAvg,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_err(self.rank, "ncclReduceScatter", e))?;
        self.enqueued("ncclReduceScatter");
        Ok(())
    }

    fn all_gather(&self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        check_chunks(self.rank, self.world, output, input)?;
        self.check(input)?;
        self.check(output)?;
        self.bind()?;
        let dt = dtype(input.kind(), self.rank)?;
        unsafe {
            result::all_gather(
                input.data_ptr(),
                output.data_ptr(),
                input.numel(),
                dt,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_err(self.rank, "ncclAllGather", e))?;
        self.enqueued("ncclAllGather");
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let mut t = Tensor::zeros([1], (Kind::Float, Device::Cuda(self.ordinal)));
        self.all_reduce_sum(&mut t)?;
        tch::Cuda::synchronize(self.ordinal as i64);
        Ok(())
    }

    fn abort(&self) {
        if self.aborted.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // The watchdog queries the communicator: it must be done before the communicator is freed.
        if let Some((w, _)) = &self.watch {
            w.halt();
        }
        unsafe {
            let _ = result::comm_abort(self.comm);
        }
    }

    fn all_reduce_sum_f64(&self, vals: &mut [f64], _device: Device) -> Result<()> {
        let mut t = Tensor::from_slice(vals).to_device(Device::Cuda(self.ordinal));
        self.all_reduce_sum(&mut t)?;
        let back = Vec::<f64>::try_from(t.to_device(Device::Cpu))?;
        vals.copy_from_slice(&back);
        Ok(())
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // The watchdog reads the communicator: stop it before the communicator goes.
        if let Some((w, h)) = self.watch.take() {
            w.stop.store(true, Ordering::SeqCst);
            let _ = h.join();
        }
        if !self.comm.is_null() && !*self.aborted.get_mut() {
            unsafe {
                let _ = result::comm_destroy(self.comm);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one GPU can check (NCCL refuses two ranks on one device): a communicator of world size 1 on `cuda:0`,
    /// where every collective is a copy, so each call's arguments are checked against the CPU collectives' semantics —
    /// data pointers of views at an offset, element counts, dtypes, the bucket loop of a buffer longer than
    /// [`BUCKET_ELEMS`] — then the watchdog's event, a buffer on the wrong device, abort and drop. Needs a CUDA
    /// device and `libnccl.so` on the library path (`gpu_check.sh` and `bench/gpu/run.sh` provide it), so it is
    /// ignored by default: on a GPU machine, `cargo test -p lexflow-gpu --features cuda --lib nccl -- --ignored`.
    /// Without an NCCL library on the search path, asking for a unique id is an error that says what to do, not
    /// cudarc's panic; with `libnccl.so` where the binaries look (scripts/setup.sh's symlink in the torch wheel's
    /// NCCL directory), it loads. Runs without a GPU: loading the library needs none.
    #[test]
    fn a_missing_nccl_library_is_an_error_saying_what_to_do() {
        let e = load_first(3, &["libnccl_lexflow_absent.so".to_string()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rank 3")
                && e.contains("cannot load NCCL: none of libnccl_lexflow_absent.so")
                && e.contains("scripts/setup.sh"),
            "{e}"
        );
        // The names cudarc tries find the set-up's symlink through this binary's run path (gpu/build.rs), as they
        // do from `lexflow` (actors/build.rs).
        nccl_library(0).unwrap();
    }

    #[test]
    #[ignore = "needs a CUDA device and libnccl.so: run with --ignored on a GPU machine"]
    fn world_of_one_on_cuda() {
        assert!(
            crate::init_cuda(),
            "no CUDA device (this test is for GPU machines)"
        );
        let id = NcclUniqueId::new().unwrap();
        let c = NcclCollective::new(id, 0, 1, 0).unwrap();
        let dev = Device::Cuda(0);
        let _ng = tch::no_grad_guard();
        for kind in [Kind::Float, Kind::BFloat16, Kind::Double, Kind::Int64] {
            let float = kind != Kind::Int64;
            let whole = Tensor::arange(64, (kind, dev));
            let before = whole.copy();
            let mut v = whole.narrow(0, 5, 24);
            c.all_reduce_sum(&mut v).unwrap();
            if float {
                c.all_reduce_mean(&mut v).unwrap();
            }
            c.broadcast(&mut v, 0).unwrap();
            assert!(
                whole.equal(&before),
                "{kind:?}: an in-place collective changed the buffer"
            );
            if float {
                let mut out = Tensor::zeros([24], (kind, dev));
                c.reduce_scatter_mean(&v, &mut out).unwrap();
                assert!(out.equal(&v), "{kind:?}: reduce-scatter of a view");
            }
            let gathered = Tensor::zeros([40], (kind, dev));
            let mut g = gathered.narrow(0, 16, 24);
            c.all_gather(&v, &mut g).unwrap();
            assert!(g.equal(&v), "{kind:?}: all-gather of a view into a view");
            assert!(
                gathered
                    .narrow(0, 0, 16)
                    .equal(&Tensor::zeros([16], (kind, dev))),
                "{kind:?}: all-gather wrote outside its output"
            );
        }
        let n = BUCKET_ELEMS + 3;
        let mut big = Tensor::ones([n], (Kind::Float, dev));
        let _ = big.narrow(0, n - 3, 3).fill_(7.0);
        c.all_reduce_mean(&mut big).unwrap();
        assert_eq!(
            big.sum(Kind::Double).double_value(&[]),
            (n - 3) as f64 + 21.0
        );
        let mut f = [1.5f64, -2.0];
        c.all_reduce_sum_f64(&mut f, dev).unwrap();
        assert_eq!(f, [1.5, -2.0]);
        c.barrier().unwrap();
        let (w, _) = c.watch.as_ref().expect("the watchdog runs");
        assert_eq!(w.probe(), Probe::Idle);
        let mut cpu = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        assert!(c.all_reduce_sum(&mut cpu).is_err());
        drop(c);
        let c = NcclCollective::new(NcclUniqueId::new().unwrap(), 0, 1, 0).unwrap();
        let mut t = Tensor::ones([8], (Kind::Float, dev));
        c.all_reduce_sum(&mut t).unwrap();
        c.abort();
        drop(c);
    }
}
