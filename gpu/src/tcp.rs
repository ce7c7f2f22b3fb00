//! Collectives between processes over TCP, for CPU ranks launched one process per rank (torchrun-style `RANK`,
//! `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) — what NCCL is for CUDA ranks.
//!
//! A star through rank 0: every rank sends its buffer to rank 0, which sums the buffers **in rank order in f64** and
//! sends the sum back (in the buffer's dtype); each rank then applies the mean's scale itself. That is exactly the
//! arithmetic of [`InProcessCollective`](crate::InProcessCollective), so a run with two processes gives bit-for-bit
//! the same gradients, losses and weights as the same run with two in-process ranks. Bandwidth is rank 0's link
//! (fine for CPU training; GPUs use NCCL).
//!
//! Rendezvous: rank 0 listens on `MASTER_ADDR:MASTER_PORT`; the others connect (retrying until
//! `LEXFLOW_RENDEZVOUS_TIMEOUT_S`, default 300 s) and introduce themselves (rank, world size). A rank that dies closes
//! its socket: its peers' pending and later calls fail with an error naming it instead of waiting forever.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::collective::Collective;
use crate::error::{GpuError, Result};

const MAGIC: &[u8; 4] = b"LXFC";
const OP_REDUCE: u8 = 1;
const OP_BROADCAST: u8 = 2;

pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// Rank 0: one stream per peer, indexed by rank (None at 0). Others: `[Some(stream to rank 0)]`.
    peers: Mutex<Vec<Option<TcpStream>>>,
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
    /// (default 29500).
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok();
        let num = |k: &str| -> Result<usize> {
            var(k)
                .ok_or_else(|| GpuError::Collective {
                    rank: usize::MAX,
                    message: format!(
                        "{k} is not set (launch one process per rank with RANK and WORLD_SIZE)"
                    ),
                })?
                .parse()
                .map_err(|_| GpuError::Collective {
                    rank: usize::MAX,
                    message: format!("{k} is not a number"),
                })
        };
        let (rank, world) = (num("RANK")?, num("WORLD_SIZE")?);
        let host = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port: u16 = var("MASTER_PORT")
            .map(|p| {
                p.parse().map_err(|_| GpuError::Collective {
                    rank,
                    message: format!("MASTER_PORT={p} is not a port number"),
                })
            })
            .transpose()?
            .unwrap_or(29500);
        let timeout = var("LEXFLOW_RENDEZVOUS_TIMEOUT_S")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(300));
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| GpuError::Collective {
                rank,
                message: format!("MASTER_ADDR={host}: cannot resolve"),
            })?;
        Self::connect(rank, world, addr, timeout)
    }

    /// Joins the group: rank 0 listens on `addr` and accepts the `world − 1` others; they connect to it.
    pub fn connect(rank: usize, world: usize, addr: SocketAddr, timeout: Duration) -> Result<Self> {
        let err = |message: String| GpuError::Collective { rank, message };
        if world == 0 || rank >= world {
            return Err(err(format!("rank {rank} outside world size {world}")));
        }
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        if world == 1 {
            return Ok(TcpCollective {
                rank,
                world,
                peers: Mutex::new(peers),
            });
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
                        s.set_read_timeout(Some(Duration::from_secs(30)))
                            .map_err(|e| err(format!("{from}: {e}")))?;
                        let mut hello = [0u8; 12];
                        s.read_exact(&mut hello)
                            .map_err(|e| err(format!("{from}: no handshake: {e}")))?;
                        let r =
                            u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes")) as usize;
                        let w =
                            u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize;
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
                        s.set_read_timeout(None)
                            .map_err(|e| err(format!("{from}: {e}")))?;
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
            s.write_all(&hello)
                .map_err(|e| err(format!("handshake with {addr}: {e}")))?;
            peers[0] = Some(s);
        }
        Ok(TcpCollective {
            rank,
            world,
            peers: Mutex::new(peers),
        })
    }

    fn io_err(&self, peer: usize, what: &str, e: std::io::Error) -> GpuError {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
        // A peer that exits closes with a FIN (EOF here); one killed with unread data in its socket resets the
        // connection instead (ECONNRESET, or EPIPE on our next send). Both mean the same to the user.
        let message = if matches!(
            e.kind(),
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
        ) {
            format!(
                "rank {peer} closed its connection during {what} (it failed or stopped: see its log; {e})"
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
        s.write_all(&head)
            .and_then(|_| s.write_all(payload))
            .map_err(|e| self.io_err(peer, "send", e))
    }

    fn recv(
        &self,
        s: &mut TcpStream,
        peer: usize,
        op: u8,
        kind: u8,
        len: usize,
    ) -> Result<Vec<u8>> {
        let mut head = [0u8; 10];
        s.read_exact(&mut head)
            .map_err(|e| self.io_err(peer, "receive", e))?;
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
        s.read_exact(&mut buf)
            .map_err(|e| self.io_err(peer, "receive", e))?;
        Ok(buf)
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
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            let summed = if self.rank == 0 {
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
            };
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
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let data: Option<Vec<u8>> = if self.rank == 0 {
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
        };
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
            tch::manual_seed(11);
            let inputs: Vec<Tensor> = (0..world)
                .map(|_| Tensor::randn([1000], (Kind::Float, Device::Cpu)).to_kind(kind))
                .collect();
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
