//! Collectives between processes over TCP, for CPU ranks launched one process per rank (torchrun-style `RANK`,
//! `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) — what NCCL is for CUDA ranks.
//!
//! A star through rank 0: every rank sends its buffer to rank 0, which sums the buffers **in rank order in f64** and
//! sends the sum back (in the buffer's dtype); each rank then applies the mean's scale itself. That is exactly the
//! arithmetic of [`InProcessCollective`](crate::InProcessCollective), so a run with two processes gives bit-for-bit
//! the same gradients, losses and weights as the same run with two in-process ranks. Bandwidth is rank 0's link
//! (fine for CPU training; GPUs use NCCL).
//!
//! Rendezvous: rank 0 listens on `MASTER_ADDR:MASTER_PORT`; the others connect (retrying) and introduce themselves
//! (rank, world size); rank 0 acknowledges each, then tells them all once the group is complete. The whole handshake
//! is bounded by `LEXFLOW_RENDEZVOUS_TIMEOUT_S` (default 300 s) on every rank, so a rank that reached a listener that
//! is not rank 0 fails naming the address instead of waiting.
//!
//! Failures: a rank that dies closes its socket: its peers' pending and later calls fail with an error naming it
//! instead of waiting forever. A rank that stops answering (hung, `SIGSTOP`ped, its node unreachable) is caught by
//! the collective timeout (`LEXFLOW_COLLECTIVE_TIMEOUT_S`, default 1800 s, shared with NCCL's watchdog:
//! [`crate::collective::watchdog`]): every read and write of a collective gives up after that long without progress, with an
//! error naming the peer, the operation and the time waited. After any failure the collective shuts all its
//! connections down, so the other ranks fail at once too.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::collective::watchdog::{WatchdogConfig, DEFAULT_TIMEOUT, TIMEOUT_ENV};
use crate::collective::Collective;
use crate::error::{GpuError, Result};

const MAGIC: &[u8; 4] = b"LXFC";
/// Rank 0's answer to a rank's hello, then (once every rank joined) the start of the group.
const ACK: &[u8; 4] = b"LXAK";
const GO: &[u8; 4] = b"LXGO";
/// Largest payload rank 0 hands out when it starts the group (the NCCL unique id is 128 bytes).
const MAX_PAYLOAD: usize = 1 << 16;
const OP_REDUCE: u8 = 1;
const OP_BROADCAST: u8 = 2;

pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// Rank 0: one stream per peer, indexed by rank (None at 0). Others: `[Some(stream to rank 0)]`.
    peers: Mutex<Vec<Option<TcpStream>>>,
    /// Longest wait of one read or write of a collective (None: forever).
    timeout: Option<Duration>,
}

fn op_name(op: u8) -> &'static str {
    match op {
        OP_REDUCE => "all-reduce",
        OP_BROADCAST => "broadcast",
        _ => "collective",
    }
}

/// `read_exact` within `timeout` in all (the socket's read timeout applies to each read; the handshake's messages are
/// a few bytes, so one or two reads).
fn read_within(s: &mut TcpStream, buf: &mut [u8], timeout: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The handshake both TCP rendezvous use (this module's collective and NCCL's unique-id exchange): rank 0 listens on
/// `addr` and accepts the `world − 1` others, each introducing itself (magic, rank, world size) and acknowledged at
/// once; a foreign or duplicate rank is refused by name. Once every rank joined, rank 0 starts the group and hands
/// each rank `payload` (the NCCL unique id; empty for the TCP collective). The whole handshake is bounded by
/// `timeout` on every rank. Returns the connections (rank 0: one per peer, indexed by rank; others: `[Some(rank 0)]`)
/// and rank 0's payload.
pub(crate) fn rendezvous(
    rank: usize,
    world: usize,
    addr: SocketAddr,
    timeout: Duration,
    payload: &[u8],
) -> Result<(Vec<Option<TcpStream>>, Vec<u8>)> {
    let err = |message: String| GpuError::Collective { rank, message };
    if world == 0 || rank >= world {
        return Err(err(format!("rank {rank} outside world size {world}")));
    }
    let deadline = Instant::now() + timeout;
    // What is left of the rendezvous time, as a socket timeout (never zero, which sockets refuse).
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    if world == 1 {
        return Ok((peers, payload.to_vec()));
    }
    if rank == 0 {
        let listener = TcpListener::bind(addr).map_err(|e| {
            err(format!(
                "cannot listen on {addr} (MASTER_ADDR:MASTER_PORT): {e}"
            ))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| err(format!("listener: {e}")))?;
        let mut joined = 1;
        while joined < world {
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false)
                        .and_then(|_| s.set_nodelay(true))
                        .map_err(|e| err(format!("{from}: {e}")))?;
                    s.set_read_timeout(Some(left().min(Duration::from_secs(30))))
                        .and_then(|_| s.set_write_timeout(Some(left())))
                        .map_err(|e| err(format!("{from}: {e}")))?;
                    let mut hello = [0u8; 12];
                    s.read_exact(&mut hello)
                        .map_err(|e| err(format!("{from}: no handshake: {e}")))?;
                    let r = u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes")) as usize;
                    let w = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize;
                    if &hello[..4] != MAGIC
                        || w != world
                        || r == 0
                        || r >= world
                        || peers[r].is_some()
                    {
                        return Err(err(format!(
                            "{from} introduced itself as rank {r} of {w} (this group: world {world}; duplicate \
                             or foreign process on MASTER_PORT?)"
                        )));
                    }
                    let mut ack = Vec::with_capacity(12);
                    ack.extend_from_slice(ACK);
                    ack.extend_from_slice(&(r as u32).to_le_bytes());
                    ack.extend_from_slice(&(world as u32).to_le_bytes());
                    s.write_all(&ack)
                        .map_err(|e| err(format!("{from} (rank {r}): handshake: {e}")))?;
                    peers[r] = Some(s);
                    joined += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<usize> =
                            (1..world).filter(|&r| peers[r].is_none()).collect();
                        return Err(err(format!(
                            "rendezvous timed out after {timeout:?} on {addr}: ranks {missing:?} never connected \
                             (started? same MASTER_ADDR/MASTER_PORT?)"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(err(format!("accept on {addr}: {e}"))),
            }
        }
        // Everyone is here: start the group, handing out rank 0's payload.
        let mut go = Vec::with_capacity(8 + payload.len());
        go.extend_from_slice(GO);
        go.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        go.extend_from_slice(payload);
        for (r, p) in peers.iter_mut().enumerate().skip(1) {
            let s = p.as_mut().expect("every rank joined");
            s.write_all(&go)
                .map_err(|e| err(format!("rank {r}: starting the group: {e}")))?;
        }
        Ok((peers, payload.to_vec()))
    } else {
        let mut s = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => break s,
                Err(e) => {
                    if Instant::now() > deadline {
                        return Err(err(format!(
                            "cannot reach rank 0 at {addr} (MASTER_ADDR:MASTER_PORT) within {timeout:?}: {e}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        s.set_nodelay(true)
            .map_err(|e| err(format!("{addr}: {e}")))?;
        let mut hello = Vec::with_capacity(12);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world as u32).to_le_bytes());
        s.set_write_timeout(Some(left()))
            .map_err(|e| err(format!("{addr}: {e}")))?;
        s.write_all(&hello)
            .map_err(|e| err(format!("handshake with {addr}: {e}")))?;
        // Rank 0 acknowledges at once; a listener that is not rank 0 of this run does not (or not like that).
        let mut ack = [0u8; 12];
        read_within(&mut s, &mut ack, left()).map_err(|e| {
            err(match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                    "{addr} (MASTER_ADDR:MASTER_PORT) accepted the connection but did not acknowledge rank \
                     {rank} within the rendezvous timeout ({timeout:?}, LEXFLOW_RENDEZVOUS_TIMEOUT_S): it is not \
                     rank 0 of this run (another process on MASTER_PORT?)"
                ),
                _ => format!(
                    "{addr} (MASTER_ADDR:MASTER_PORT) closed the connection during the handshake ({e}): rank 0 \
                     refused rank {rank} of {world} (see its log: another world size, or this rank twice?)"
                ),
            })
        })?;
        let (r, w) = (
            u32::from_le_bytes(ack[4..8].try_into().expect("4 bytes")) as usize,
            u32::from_le_bytes(ack[8..12].try_into().expect("4 bytes")) as usize,
        );
        if &ack[..4] != ACK || r != rank || w != world {
            return Err(err(format!(
                "{addr} (MASTER_ADDR:MASTER_PORT) did not answer the handshake as rank 0 of a group of world \
                 {world}: it is not rank 0 of this run (another process on MASTER_PORT?)"
            )));
        }
        // Then the start of the group, once every rank joined rank 0.
        let mut go = [0u8; 8];
        read_within(&mut s, &mut go, left()).map_err(|e| {
            err(match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                    "rendezvous on {addr} timed out after {timeout:?} (LEXFLOW_RENDEZVOUS_TIMEOUT_S): rank 0 \
                     accepted rank {rank}, but not every rank of {world} joined (see rank 0's log)"
                ),
                _ => format!(
                    "rank 0 at {addr} gave up the rendezvous ({e}): see its log (a rank never connected?)"
                ),
            })
        })?;
        let len = u32::from_le_bytes(go[4..8].try_into().expect("4 bytes")) as usize;
        if &go[..4] != GO || len > MAX_PAYLOAD {
            return Err(err(format!(
                "{addr}: unexpected bytes where rank 0 starts the group (not a lexflow rank 0 of this version?)"
            )));
        }
        let mut got = vec![0u8; len];
        read_within(&mut s, &mut got, left())
            .map_err(|e| err(format!("rank 0 at {addr}: reading the group's start: {e}")))?;
        peers[0] = Some(s);
        Ok((peers, got))
    }
}

/// Where and how long the ranks of one group meet, from torchrun-style variables (shared by the TCP collective and
/// NCCL's unique-id exchange).
pub(crate) struct RendezvousEnv {
    pub rank: usize,
    pub world: usize,
    pub addr: SocketAddr,
    pub timeout: Duration,
}

/// Default of `LEXFLOW_RENDEZVOUS_TIMEOUT_S`.
pub(crate) const DEFAULT_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);

impl RendezvousEnv {
    /// `RANK`, `WORLD_SIZE` (required), `MASTER_ADDR` (default 127.0.0.1), `MASTER_PORT` (default 29500),
    /// `LEXFLOW_RENDEZVOUS_TIMEOUT_S` (whole seconds, default 300). A value that does not parse is an error naming
    /// the variable, never a silent default.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let bad = |rank: usize, message: String| GpuError::Collective { rank, message };
        let num = |k: &str| -> Result<usize> {
            let v = var(k).ok_or_else(|| {
                bad(
                    usize::MAX,
                    format!(
                        "{k} is not set (launch one process per rank with RANK and WORLD_SIZE)"
                    ),
                )
            })?;
            v.trim()
                .parse()
                .map_err(|_| bad(usize::MAX, format!("{k}={v} is not a number")))
        };
        let (rank, world) = (num("RANK")?, num("WORLD_SIZE")?);
        if world == 0 || rank >= world {
            return Err(bad(
                rank,
                format!("RANK={rank} is outside WORLD_SIZE={world} (ranks are 0..WORLD_SIZE-1)"),
            ));
        }
        let host = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port: u16 = match var("MASTER_PORT") {
            None => 29500,
            Some(p) => p.trim().parse().map_err(|_| {
                bad(
                    rank,
                    format!("MASTER_PORT={p} is not a port number (1-65535)"),
                )
            })?,
        };
        let timeout = match var("LEXFLOW_RENDEZVOUS_TIMEOUT_S") {
            None => DEFAULT_RENDEZVOUS_TIMEOUT,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(s) if s > 0 => Duration::from_secs(s),
                _ => {
                    return Err(bad(
                        rank,
                        format!(
                            "LEXFLOW_RENDEZVOUS_TIMEOUT_S={v} is not a positive whole number of seconds (default 300)"
                        ),
                    ))
                }
            },
        };
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| bad(rank, format!("MASTER_ADDR={host}: cannot resolve")))?;
        Ok(RendezvousEnv {
            rank,
            world,
            addr,
            timeout,
        })
    }
}

fn kind_code(k: Kind) -> Result<u8> {
    Ok(match k {
        Kind::Float => 1,
        Kind::Double => 2,
        Kind::BFloat16 => 3,
        Kind::Half => 4,
        Kind::Int64 => 5,
        other => {
            return Err(GpuError::Collective {
                rank: usize::MAX,
                message: format!("TCP collective: unsupported dtype {other:?}"),
            })
        }
    })
}

impl TcpCollective {
    /// From torchrun-style variables: `RANK`, `WORLD_SIZE`, `MASTER_ADDR` (default 127.0.0.1), `MASTER_PORT`
    /// (default 29500), `LEXFLOW_RENDEZVOUS_TIMEOUT_S` (default 300) and the collective timeout
    /// ([`WatchdogConfig::from_env`]).
    pub fn from_env() -> Result<Self> {
        let env = RendezvousEnv::from_env()?;
        let collective = WatchdogConfig::from_env()
            .map_err(|e| GpuError::Collective {
                rank: env.rank,
                message: e.to_string(),
            })?
            .timeout;
        Self::connect_with(env.rank, env.world, env.addr, env.timeout, collective)
    }

    /// [`connect_with`](Self::connect_with) with the default collective timeout ([`DEFAULT_TIMEOUT`]).
    pub fn connect(rank: usize, world: usize, addr: SocketAddr, timeout: Duration) -> Result<Self> {
        Self::connect_with(rank, world, addr, timeout, Some(DEFAULT_TIMEOUT))
    }

    /// Joins the group: rank 0 listens on `addr` and accepts the `world − 1` others; they connect to it. The
    /// handshake gives up after `timeout` (the rendezvous timeout); later, one read or write of a collective gives
    /// up after `collective` without progress (None: never).
    pub fn connect_with(
        rank: usize,
        world: usize,
        addr: SocketAddr,
        timeout: Duration,
        collective: Option<Duration>,
    ) -> Result<Self> {
        let err = |message: String| GpuError::Collective { rank, message };
        // `set_read_timeout(Some(0))` is an error: a zero timeout means none.
        let collective = collective.filter(|t| !t.is_zero());
        let (peers, _) = rendezvous(rank, world, addr, timeout, &[])?;
        for s in peers.iter().flatten() {
            s.set_read_timeout(collective)
                .and_then(|_| s.set_write_timeout(collective))
                .map_err(|e| err(format!("setting the collective timeout: {e}")))?;
        }
        Ok(TcpCollective {
            rank,
            world,
            peers: Mutex::new(peers),
            timeout: collective,
        })
    }

    #[cfg(test)]
    fn io_err(&self, peer: usize, what: &str, e: std::io::Error) -> GpuError {
        self.io_err_after(peer, what, e, Duration::ZERO)
    }

    /// `what`: the operation and the direction ("all-reduce: receive"); `waited`: since the read or write began.
    fn io_err_after(
        &self,
        peer: usize,
        what: &str,
        e: std::io::Error,
        waited: Duration,
    ) -> GpuError {
        use std::io::ErrorKind::{
            BrokenPipe, ConnectionAborted, ConnectionReset, TimedOut, UnexpectedEof, WouldBlock,
        };
        // A peer that exits closes with a FIN (EOF here); one killed with unread data in its socket resets the
        // connection instead (ECONNRESET, or EPIPE on our next send). Both mean the same to the user.
        let message = if matches!(
            e.kind(),
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
        ) {
            format!(
                "rank {peer} closed its connection during {what} (it failed or stopped: see its log; {e})"
            )
        } else if matches!(e.kind(), WouldBlock | TimedOut) {
            // A socket timeout (SO_RCVTIMEO/SO_SNDTIMEO: EAGAIN on Linux): the peer made no progress for that long.
            let limit = self.timeout.map_or(0, |t| t.as_secs());
            format!(
                "rank {peer} did not answer during {what}: waited {} s, the last {limit} s without any progress \
                 (collective timeout {TIMEOUT_ENV}={limit}): it is stuck, stopped or unreachable (a legitimate wait, \
                 e.g. rank 0 writing a large checkpoint, needs a larger {TIMEOUT_ENV}); the run stops here; \
                 checkpoints are intact: `--resume` continues from the last one",
                waited.as_secs_f64().round() as u64
            )
        } else {
            format!("{what} with rank {peer}: {e}")
        };
        GpuError::Collective {
            rank: self.rank,
            message,
        }
    }

    fn send(&self, s: &mut TcpStream, peer: usize, op: u8, kind: u8, payload: &[u8]) -> Result<()> {
        let mut head = [0u8; 10];
        head[0] = op;
        head[1] = kind;
        head[2..10].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        let t0 = Instant::now();
        s.write_all(&head)
            .and_then(|_| s.write_all(payload))
            .map_err(|e| {
                self.io_err_after(peer, &format!("{}: send", op_name(op)), e, t0.elapsed())
            })
    }

    fn recv(
        &self,
        s: &mut TcpStream,
        peer: usize,
        op: u8,
        kind: u8,
        len: usize,
    ) -> Result<Vec<u8>> {
        let what = || format!("{}: receive", op_name(op));
        let mut head = [0u8; 10];
        let t0 = Instant::now();
        s.read_exact(&mut head)
            .map_err(|e| self.io_err_after(peer, &what(), e, t0.elapsed()))?;
        let n = u64::from_le_bytes(head[2..10].try_into().expect("8 bytes")) as usize;
        if head[0] != op || head[1] != kind || n != len {
            return Err(GpuError::Collective {
                rank: self.rank,
                message: format!(
                    "rank {peer} sent op {} dtype {} of {n} bytes where op {op} dtype {kind} of {len} bytes was \
                     expected: the ranks are not running the same program/config",
                    head[0], head[1]
                ),
            });
        }
        let mut buf = vec![0u8; n];
        let t0 = Instant::now();
        s.read_exact(&mut buf)
            .map_err(|e| self.io_err_after(peer, &what(), e, t0.elapsed()))?;
        Ok(buf)
    }

    /// After a failed exchange the byte streams are out of step (a late peer may still send the rest): shut every
    /// connection down, so that later calls fail at once and the peers notice now instead of at their own timeout.
    fn fail<T>(&self, peers: &mut [Option<TcpStream>], r: Result<T>) -> Result<T> {
        if r.is_err() {
            for s in peers.iter_mut().filter_map(Option::take) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        r
    }

    fn poisoned(&self) -> GpuError {
        GpuError::Collective {
            rank: self.rank,
            message: "collective used after an abort".into(),
        }
    }

    fn reduce(&self, buf: &mut Tensor, scale: f64) -> Result<()> {
        if self.world > 1 {
            let kind = buf.kind();
            let code = kind_code(kind)?;
            let host = buf.detach().to_device(Device::Cpu).contiguous();
            let bytes = tensor_bytes(&host);
            let mut guard = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            let peers = &mut *guard;
            let summed = (|| -> Result<Tensor> {
                Ok(if self.rank == 0 {
                    // Rank order, in f64: the arithmetic of the in-process collective.
                    let mut acc = host.to_kind(Kind::Double).reshape([-1]);
                    for (r, p) in peers.iter_mut().enumerate().skip(1) {
                        let s = p.as_mut().ok_or_else(|| self.poisoned())?;
                        let got = self.recv(s, r, OP_REDUCE, code, bytes.len())?;
                        let t = Tensor::from_data_size(&got, &[host.numel() as i64], kind);
                        acc += t.to_kind(Kind::Double);
                    }
                    let out = acc.to_kind(kind);
                    let out_bytes = tensor_bytes(&out);
                    for (r, p) in peers.iter_mut().enumerate().skip(1) {
                        let s = p.as_mut().ok_or_else(|| self.poisoned())?;
                        self.send(s, r, OP_REDUCE, code, &out_bytes)?;
                    }
                    out
                } else {
                    let s = peers[0].as_mut().ok_or_else(|| self.poisoned())?;
                    self.send(s, 0, OP_REDUCE, code, &bytes)?;
                    let got = self.recv(s, 0, OP_REDUCE, code, bytes.len())?;
                    Tensor::from_data_size(&got, &[host.numel() as i64], kind)
                })
            })();
            let summed = self.fail(peers, summed)?;
            drop(guard);
            let _ng = tch::no_grad_guard();
            buf.copy_(&summed.view(buf.size().as_slice()).to_device(buf.device()));
        }
        if scale != 1.0 {
            let _ = buf.g_mul_scalar_(scale);
        }
        Ok(())
    }
}

fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let n = t.numel();
    let mut out = vec![0u8; n * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut out, n);
    out
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&self, buf: &mut Tensor) -> Result<()> {
        self.reduce(buf, 1.0 / self.world as f64)
    }

    fn all_reduce_sum(&self, buf: &mut Tensor) -> Result<()> {
        self.reduce(buf, 1.0)
    }

    fn broadcast(&self, buf: &mut Tensor, root: usize) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        if root >= self.world {
            return Err(GpuError::Collective {
                rank: self.rank,
                message: format!("broadcast root {root} outside world size {}", self.world),
            });
        }
        let kind = buf.kind();
        let code = kind_code(kind)?;
        let host = buf.detach().to_device(Device::Cpu).contiguous();
        let len = host.numel() * kind.elt_size_in_bytes();
        let mut guard = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let peers = &mut *guard;
        let data = (|| -> Result<Option<Vec<u8>>> {
            Ok(if self.rank == 0 {
                let data = if root == 0 {
                    tensor_bytes(&host)
                } else {
                    let s = peers[root].as_mut().ok_or_else(|| self.poisoned())?;
                    self.recv(s, root, OP_BROADCAST, code, len)?
                };
                for (r, p) in peers.iter_mut().enumerate().skip(1) {
                    if r != root {
                        let s = p.as_mut().ok_or_else(|| self.poisoned())?;
                        self.send(s, r, OP_BROADCAST, code, &data)?;
                    }
                }
                (root != 0).then_some(data)
            } else {
                let s = peers[0].as_mut().ok_or_else(|| self.poisoned())?;
                if self.rank == root {
                    self.send(s, 0, OP_BROADCAST, code, &tensor_bytes(&host))?;
                    None
                } else {
                    Some(self.recv(s, 0, OP_BROADCAST, code, len)?)
                }
            })
        })();
        let data = self.fail(peers, data)?;
        drop(guard);
        if let Some(d) = data {
            let t = Tensor::from_data_size(&d, &[host.numel() as i64], kind);
            let _ng = tch::no_grad_guard();
            buf.copy_(&t.view(buf.size().as_slice()).to_device(buf.device()));
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let mut t = Tensor::zeros([1], (Kind::Double, Device::Cpu));
        self.all_reduce_sum(&mut t)
    }

    fn abort(&self) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        for s in peers.iter_mut().filter_map(Option::take) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InProcessCollective;

    fn free_addr() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    fn group(world: usize) -> Vec<TcpCollective> {
        let addr = free_addr();
        let handles: Vec<_> = (0..world)
            .map(|r| {
                std::thread::spawn(move || {
                    TcpCollective::connect(r, world, addr, Duration::from_secs(20)).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Same inputs ⇒ bit-identical results to the in-process collective (sum, mean, broadcast from a non-zero
    /// root), for f32 and bf16.
    #[test]
    fn matches_the_in_process_collective_bit_for_bit() {
        let world = 3;
        for kind in [Kind::Float, Kind::BFloat16] {
            let inputs: Vec<Tensor> = {
                let _g = crate::model::rng_lock();
                tch::manual_seed(11);
                (0..world)
                    .map(|_| Tensor::randn([1000], (Kind::Float, Device::Cpu)).to_kind(kind))
                    .collect()
            };
            let run = |colls: Vec<Box<dyn Collective>>| -> Vec<(Tensor, Tensor, Tensor)> {
                let hs: Vec<_> = colls
                    .into_iter()
                    .zip(inputs.iter().map(|t| t.copy()))
                    .map(|(c, x)| {
                        std::thread::spawn(move || {
                            let (mut a, mut b, mut c2) = (x.copy(), x.copy(), x.copy());
                            c.all_reduce_sum(&mut a).unwrap();
                            c.all_reduce_mean(&mut b).unwrap();
                            c.broadcast(&mut c2, 2).unwrap();
                            c.barrier().unwrap();
                            (a, b, c2)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            };
            let tcp = run(group(world)
                .into_iter()
                .map(|c| Box::new(c) as Box<dyn Collective>)
                .collect());
            let inp = run(InProcessCollective::group(world)
                .into_iter()
                .map(|c| Box::new(c) as Box<dyn Collective>)
                .collect());
            for r in 0..world {
                assert!(
                    tcp[r].0.equal(&inp[r].0),
                    "{kind:?} sum differs on rank {r}"
                );
                assert!(
                    tcp[r].1.equal(&inp[r].1),
                    "{kind:?} mean differs on rank {r}"
                );
                assert!(
                    tcp[r].2.equal(&inputs[2]),
                    "{kind:?} broadcast wrong on rank {r}"
                );
            }
            // And the sum is a sum.
            let want = inputs.iter().fold(
                Tensor::zeros([1000], (Kind::Double, Device::Cpu)),
                |a, t| a + t.to_kind(Kind::Double),
            );
            let d = (tcp[0].0.to_kind(Kind::Double) - want)
                .abs()
                .max()
                .double_value(&[]);
            assert!(d < 0.05, "{d}");
        }
    }

    #[test]
    fn a_dead_peer_is_an_error_naming_it_not_a_hang() {
        let mut g = group(2);
        let r1 = g.pop().unwrap();
        let r0 = g.pop().unwrap();
        drop(r1); // rank 1 "dies": its socket closes
        let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let e = r0.all_reduce_sum(&mut t).unwrap_err().to_string();
        assert!(e.contains("rank 1 closed its connection"), "{e}");
    }

    #[test]
    fn a_reset_connection_names_the_peer_like_a_closed_one() {
        // A peer killed with unread data in its socket resets the connection instead of closing it (seen in
        // `tests/multi_process.rs`: "Connection reset by peer"); the user must read the same diagnosis.
        let g = group(2);
        for kind in [
            std::io::ErrorKind::UnexpectedEof,
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::ConnectionAborted,
            std::io::ErrorKind::BrokenPipe,
        ] {
            let e = g[0].io_err(1, "receive", kind.into()).to_string();
            assert!(
                e.contains("rank 1 closed its connection during receive"),
                "{kind:?}: {e}"
            );
        }
        let e = g[0]
            .io_err(1, "receive", std::io::ErrorKind::TimedOut.into())
            .to_string();
        assert!(!e.contains("closed its connection"), "{e}");
    }

    #[test]
    fn mismatched_buffers_are_reported() {
        let g = group(2);
        let mut it = g.into_iter();
        let (r0, r1) = (it.next().unwrap(), it.next().unwrap());
        let h = std::thread::spawn(move || {
            let mut t = Tensor::ones([5], (Kind::Float, Device::Cpu));
            let _ = r1.all_reduce_sum(&mut t);
        });
        let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let e = r0.all_reduce_sum(&mut t).unwrap_err().to_string();
        assert!(e.contains("not running the same program"), "{e}");
        r0.abort();
        h.join().unwrap();
    }

    /// Runs `f` on a thread and returns its result, failing the test if it is still blocked after `limit`: a hang
    /// is a test failure here, not a test that never ends.
    fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(limit) {
            Ok(v) => v,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("still blocked after {limit:?}: a hang")
            }
            Err(e) => panic!("the thread panicked ({e})"),
        }
    }

    /// Joins `addr` as `rank` of `world` with a valid hello, then never reads or sends anything (a hung or
    /// `SIGSTOP`ped process). The returned socket keeps the connection open.
    fn silent_rank(addr: SocketAddr, rank: usize, world: usize) -> TcpStream {
        let mut s = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world as u32).to_le_bytes());
        s.write_all(&hello).unwrap();
        s
    }

    /// A peer that stops answering (a thread that joins and then never sends) fails rank 0's collective after the
    /// collective timeout, naming the peer, the operation and the variable, instead of blocking forever; rank 0 then
    /// shuts its other connections down, so rank 2 (no timeout of its own) fails at once too.
    #[test]
    fn a_stuck_peer_times_out_naming_it_not_a_hang() {
        let addr = free_addr();
        let stuck = std::thread::spawn(move || silent_rank(addr, 1, 3));
        let r2 = std::thread::spawn(move || {
            let c = TcpCollective::connect_with(2, 3, addr, Duration::from_secs(20), None).unwrap();
            let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
            c.all_reduce_sum(&mut t).unwrap_err().to_string()
        });
        let t0 = Instant::now();
        let (e, again) = within(Duration::from_secs(30), move || {
            let c = TcpCollective::connect_with(
                0,
                3,
                addr,
                Duration::from_secs(20),
                Some(Duration::from_secs(1)),
            )
            .unwrap();
            let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
            let e = c.all_reduce_sum(&mut t).unwrap_err().to_string();
            let again = c.barrier().unwrap_err().to_string();
            (e, again)
        });
        assert!(
            e.contains("rank 1 did not answer during all-reduce: receive")
                && e.contains("LEXFLOW_COLLECTIVE_TIMEOUT_S=1")
                && e.contains("waited "),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
        assert!(again.contains("used after an abort"), "{again}");
        let e2 = within(Duration::from_secs(10), move || r2.join().unwrap());
        assert!(e2.contains("rank 0 closed its connection"), "{e2}");
        drop(stuck.join().unwrap());
    }

    /// A rank 0 that stops reading (its socket buffers fill up) fails a rank's send after the collective timeout.
    #[test]
    fn a_peer_that_stops_reading_times_out_the_sender() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stuck_rank0 = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut hello = [0u8; 12];
            s.read_exact(&mut hello).unwrap();
            let mut ack = ACK.to_vec();
            ack.extend_from_slice(&hello[4..12]);
            ack.extend_from_slice(GO);
            ack.extend_from_slice(&0u32.to_le_bytes()); // no payload
            s.write_all(&ack).unwrap();
            s // never reads again
        });
        let e = within(Duration::from_secs(60), move || {
            let c = TcpCollective::connect_with(
                1,
                2,
                addr,
                Duration::from_secs(20),
                Some(Duration::from_secs(1)),
            )
            .unwrap();
            // 64 MB: more than the loopback socket buffers hold.
            let mut t = Tensor::zeros([16 << 20], (Kind::Float, Device::Cpu));
            c.all_reduce_sum(&mut t).unwrap_err().to_string()
        });
        assert!(
            e.contains("rank 0 did not answer during all-reduce: send"),
            "{e}"
        );
        drop(stuck_rank0.join().unwrap());
    }

    /// A rank whose MASTER_ADDR:MASTER_PORT is a listener that is not rank 0 fails within the rendezvous timeout,
    /// naming the address, instead of joining a "group" and blocking in its first collective.
    #[test]
    fn a_listener_that_is_not_rank_0_is_named_within_the_rendezvous_timeout() {
        let other = TcpListener::bind("127.0.0.1:0").unwrap(); // accepts (backlog), never answers
        let addr = other.local_addr().unwrap();
        let t0 = Instant::now();
        let e = within(Duration::from_secs(20), move || {
            TcpCollective::connect_with(1, 2, addr, Duration::from_secs(1), None)
                .err()
                .map(|e| e.to_string())
        })
        .expect("joined a listener that never answered");
        assert!(
            e.contains(&addr.to_string()) && e.contains("did not acknowledge rank 1"),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        drop(other);
    }

    /// Rank 0 refuses a rank of another world size; that rank hears it instead of joining.
    #[test]
    fn a_refused_rank_hears_it_from_rank_0() {
        let addr = free_addr();
        let r0 = std::thread::spawn(move || {
            TcpCollective::connect(0, 2, addr, Duration::from_secs(20))
                .err()
                .map(|e| e.to_string())
        });
        let e1 = within(Duration::from_secs(30), move || {
            TcpCollective::connect_with(1, 3, addr, Duration::from_secs(20), None)
                .err()
                .map(|e| e.to_string())
        })
        .expect("rank 1 of 3 joined a group of 2");
        assert!(
            e1.contains("closed the connection during the handshake"),
            "{e1}"
        );
        let e0 = r0.join().unwrap().expect("rank 0 accepted rank 1 of 3");
        assert!(e0.contains("introduced itself as rank 1 of 3"), "{e0}");
    }

    /// A rank that joined waits for the whole group within the rendezvous timeout, not forever.
    #[test]
    fn a_joined_rank_fails_when_the_group_never_completes() {
        let addr = free_addr();
        let r0 = std::thread::spawn(move || {
            TcpCollective::connect(0, 3, addr, Duration::from_secs(1))
                .err()
                .map(|e| e.to_string())
        });
        let e1 = within(Duration::from_secs(20), move || {
            TcpCollective::connect_with(1, 3, addr, Duration::from_secs(1), None)
                .err()
                .map(|e| e.to_string())
        })
        .expect("rank 1 joined a group without rank 2");
        assert!(
            e1.contains("gave up the rendezvous") || e1.contains("not every rank of 3 joined"),
            "{e1}"
        );
        let e0 = r0.join().unwrap().unwrap();
        assert!(e0.contains("ranks [2] never connected"), "{e0}");
    }

    /// Rank 0's payload (NCCL's unique id goes this way) reaches every rank, whatever order they start in.
    #[test]
    fn the_rendezvous_hands_rank_0s_payload_to_every_rank() {
        let addr = free_addr();
        let payload: Vec<u8> = (0..128u32).map(|i| (i * 7 + 3) as u8).collect();
        let world = 4;
        let handles: Vec<_> = (0..world)
            .rev()
            .map(|r| {
                let mine = if r == 0 { payload.clone() } else { Vec::new() };
                std::thread::spawn(move || {
                    let (peers, got) =
                        rendezvous(r, world, addr, Duration::from_secs(20), &mine).unwrap();
                    (r, peers.iter().flatten().count(), got)
                })
            })
            .collect();
        for h in handles {
            let (r, conns, got) = h.join().unwrap();
            assert_eq!(got, payload, "rank {r}");
            assert_eq!(conns, if r == 0 { world - 1 } else { 1 }, "rank {r}");
        }
    }

    /// Variables that do not parse are errors naming them, never silent defaults; ranks are checked against the world.
    #[test]
    fn rendezvous_variables_are_checked() {
        let from = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            RendezvousEnv::from_vars(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        };
        let ok = from(&[("RANK", "1"), ("WORLD_SIZE", "2")]).unwrap();
        assert_eq!((ok.rank, ok.world), (1, 2));
        assert_eq!(ok.addr, "127.0.0.1:29500".parse().unwrap());
        assert_eq!(ok.timeout, DEFAULT_RENDEZVOUS_TIMEOUT);
        let t = from(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LEXFLOW_RENDEZVOUS_TIMEOUT_S", "7"),
        ])
        .unwrap();
        assert_eq!(t.timeout, Duration::from_secs(7));
        for (vars, needle) in [
            (vec![("WORLD_SIZE", "2")], "RANK is not set"),
            (
                vec![("RANK", "x"), ("WORLD_SIZE", "2")],
                "RANK=x is not a number",
            ),
            (
                vec![("RANK", "2"), ("WORLD_SIZE", "2")],
                "RANK=2 is outside WORLD_SIZE=2",
            ),
            (
                vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")],
                "MASTER_PORT=70000",
            ),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("LEXFLOW_RENDEZVOUS_TIMEOUT_S", "5m"),
                ],
                "LEXFLOW_RENDEZVOUS_TIMEOUT_S=5m",
            ),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("LEXFLOW_RENDEZVOUS_TIMEOUT_S", "0"),
                ],
                "LEXFLOW_RENDEZVOUS_TIMEOUT_S=0",
            ),
        ] {
            let e = from(&vars)
                .err()
                .unwrap_or_else(|| panic!("{vars:?} accepted"))
                .to_string();
            assert!(e.contains(needle), "{vars:?}: {e}");
        }
    }

    #[test]
    fn rendezvous_times_out_with_the_missing_ranks() {
        let addr = free_addr();
        let e = TcpCollective::connect(0, 3, addr, Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("ranks [1, 2] never connected"), "{e}");
    }
}
