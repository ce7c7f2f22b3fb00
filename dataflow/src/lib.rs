//! # lexflow-dataflow
//!
//! The runtime every lexflow pipeline runs on, knowing nothing of FORMEX or LLaMA.
//!
//! * An **actor** is a named OS thread that owns its state ([`Topology::spawn`]). Its result (an error or a panic) is
//!   collected by the topology's supervisor; the first failure cancels the run and is reported with the actor's name
//!   and the input it was working on ([`ActorContext::set_input`]).
//! * An **edge** is a bounded, blocking channel ([`edge`]) whose capacity is a `NonZeroUsize`: a full edge blocks its
//!   sender (backpressure), nothing is ever dropped and nothing is unbounded. Messages carry batches. Edges record queue
//!   depth, time blocked (senders) and time starved (receivers) in `lexflow-metrics`.
//! * An **ordered pool** ([`ordered_pool`]) is a parallel map that keeps the order of its input: items are dealt
//!   round-robin to N workers and collected round-robin, so the output is the same for any N (determinism).
//! * **Shutdown** ([`Shutdown`]): Ctrl-C/SIGTERM or a failure sets one flag; sources stop reading, the rest drains.

mod edge;
mod pool;
mod shutdown;
mod topology;

pub use edge::{edge, EdgeReceiver, EdgeSender, RecvError, SendError};
pub use pool::ordered_pool;
pub use shutdown::Shutdown;
pub use topology::{error_chain, ActorContext, ActorError, RunError, Topology};
