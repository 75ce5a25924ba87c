//! Collectives between the ranks of one rendezvous generation.
//!
//! # Layout
//! - `Communicator` (this file): the tensor-level interface the training loop uses (all-reduce,
//!   reduce-scatter, all-gather-cat, broadcast, barrier), `ReduceOp`, `AbortHandle`. Implementations
//!   own their transport and tear it down on drop.
//! - `cpu`: `CpuCommunicator`, the `Communicator` for CPU tensors over a `TcpRing`; `connect_cpu`,
//!   `connect_cpu_with`, `connect_cpu_alone` (a world of one).
//! - `options`: `PeerInfo` (address and host of a rank), `Transport`, `CpuOptions`.
//! - `tcp`: `TcpRing`, one rank's ring (set-up and handshake, link transport negotiation, poisoning and
//!   failure notices) and its collectives over host buffers.
//! - `engine`: the progress engine that runs a collective's messages over both links on one thread,
//!   pipelined segment by segment, and waits (spin, then poll) with timeouts, liveness and abort checks.
//! - `ring`: the ring algorithms as plans for the engine (reduce-scatter + all-gather, reduce-scatter,
//!   variable all-gather, broadcast).
//! - `link`: a rank's two neighbours: tcp and shared-memory data paths, record reader, abort state,
//!   neighbour liveness.
//! - `shm`: the shared-memory ring of segments between two ranks on one host (the only `unsafe` besides
//!   `tensor_mem`).
//! - `tensor_mem`: element views of a dense CPU tensor's memory, so reductions need no copies.
//! - `element`: `Element` (f32, f64, bf16) and the reduction kernels; where rounding happens.
//! - `frame`: wire formats (handshake, link offer, record header, abort notice).
//! - `meta`: the kind-and-shape header that travels with tensor data.
//! - `error`: `CommError`, which names the operation and the peer (or reporting rank) of every failure.
//! - `nccl`: the NCCL `Communicator` for CUDA tensors.
//!
//! Contract for all collectives: every rank calls them in the same order with matching arguments, from
//! one thread (the training thread; the calls block). A peer that makes no progress for the ring's
//! timeout turns into an error naming it; the rank that fails first tells the others, which fail at
//! once naming it; after such an error the communicator is unusable and the caller re-joins a new
//! generation.

mod cpu;
mod element;
mod engine;
mod error;
mod frame;
mod link;
mod meta;
pub mod nccl;
mod options;
mod ring;
mod shm;
mod tcp;
mod tensor_mem;

#[cfg(test)]
pub(crate) mod testing;

pub use cpu::{CpuCommunicator, connect_cpu, connect_cpu_alone, connect_cpu_with};
pub use element::Element;
pub use error::CommError;
pub use options::{CpuOptions, DEFAULT_SEGMENT_BYTES, PeerInfo, Transport, UnknownTransport};
pub use ring::chunk_range;
pub use tcp::TcpRing;

/// How `all_reduce` and `reduce_scatter` combine the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the world size.
    Average,
}

/// Aborts a communicator from another thread (the heartbeat task, when the coordinator opens a new
/// generation or fails the job): every blocked or later collective of that communicator returns
/// `CommError::Aborted` carrying `reason`, promptly. Cheap to clone; calling it twice keeps the first reason.
#[derive(Clone)]
pub struct AbortHandle {
    inner: std::sync::Arc<dyn Fn(&str) + Send + Sync>,
}

impl AbortHandle {
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> AbortHandle {
        AbortHandle { inner: std::sync::Arc::new(f) }
    }

    pub fn abort(&self, reason: &str) {
        (self.inner)(reason)
    }
}

impl std::fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AbortHandle")
    }
}

/// Collectives on tensors across the ranks of one generation.
///
/// Element kinds: Float, Double and BFloat16 for the reductions (bf16 sums in f32 and rounds once per
/// ring step); any kind for gathers and broadcasts. A communicator belongs to one generation, carries a
/// timeout, can be aborted through [`Communicator::abort_handle`], and tears its transport down on drop.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn generation(&self) -> u64;
    /// A handle that aborts this communicator from another thread.
    fn abort_handle(&self) -> AbortHandle;
    /// In-place reduction over ranks; any shape; made contiguous. Every rank ends with bit-identical
    /// values. Ranks must pass the same number of elements (checked); shapes themselves are not compared.
    fn all_reduce(&mut self, t: &mut tch::Tensor, op: ReduceOp) -> Result<(), CommError>;
    /// In-place sum over ranks (`all_reduce` with [`ReduceOp::Sum`]).
    fn all_reduce_sum(&mut self, t: &mut tch::Tensor) -> Result<(), CommError> {
        self.all_reduce(t, ReduceOp::Sum)
    }
    /// Reduces `t` (same number of elements on every rank, flattened) and returns this rank's chunk of
    /// the result as a 1-D tensor: chunk `r` is elements `[r*n/W, (r+1)*n/W)` (`chunk_range`).
    fn reduce_scatter(&mut self, t: &tch::Tensor, op: ReduceOp) -> Result<tch::Tensor, CommError>;
    /// Concatenate along dim 0 the tensors of all ranks in rank order; dim 0 may differ per rank
    /// (including 0 rows), the other dims and the kind must agree (checked: mismatch is an error naming the rank).
    fn all_gather_cat(&mut self, t: &tch::Tensor) -> Result<tch::Tensor, CommError>;
    /// In-place: every rank ends with root's values (shape and kind must agree; a non-root rank whose
    /// tensor differs gets `Mismatch`, the root does not learn of it).
    fn broadcast(&mut self, t: &mut tch::Tensor, root: usize) -> Result<(), CommError>;
    fn barrier(&mut self) -> Result<(), CommError>;
}
