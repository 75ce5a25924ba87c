//! Collectives between the ranks of one rendezvous generation.
//!
//! # Layout
//! - `Communicator` (this file): the tensor-level interface the training loop uses (all-reduce,
//!   all-gather-cat, broadcast, barrier). Implementations own their transport and tear it down on drop.
//! - `cpu`: `CpuCommunicator`, the `Communicator` for CPU tensors over a `TcpRing`; `connect_cpu`.
//! - `tcp`: `TcpRing`, one rank's ring of TCP connections (set-up and handshake, timeouts, poisoning
//!   after a failure) and its collectives over host buffers; `Element`, the summable element types.
//! - `ring`: the ring algorithms (reduce-scatter + all-gather, variable all-gather, broadcast).
//! - `link`: framed, timed i/o with one neighbour.
//! - `frame`: wire formats of the ring (handshake and frame header).
//! - `meta`: the kind-and-shape header that travels with tensor data.
//! - `error`: `CommError`, which names the operation and the peer of every failure.
//!
//! Seams for later: a shared-memory transport for ranks on one host, pipelined (chunked) ring steps,
//! an NCCL `Communicator` for CUDA tensors, and an abort path that wakes a blocked collective when the
//! coordinator declares the generation dead all fit behind `Communicator` without changing callers.
//!
//! Contract for all collectives: every rank calls them in the same order with matching arguments, from
//! one thread (the training thread; the calls block). A peer that makes no progress for the ring's
//! timeout turns into an error naming it; after such an error the communicator is unusable and the
//! caller re-joins a new generation.

mod cpu;
mod error;
mod frame;
mod link;
mod meta;
mod ring;
mod tcp;

#[cfg(test)]
mod testing;

pub use cpu::{CpuCommunicator, connect_cpu};
pub use error::CommError;
pub use tcp::{Element, TcpRing};

/// Collectives on tensors across the ranks of one generation.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn generation(&self) -> u64;
    /// In-place sum over ranks. CPU tensors of kind Float or Double; any shape; made contiguous.
    /// Every rank ends with bit-identical values. Ranks must pass the same number of elements (checked);
    /// the shapes themselves are not compared.
    fn all_reduce_sum(&mut self, t: &mut tch::Tensor) -> Result<(), CommError>;
    /// Concatenate along dim 0 the tensors of all ranks in rank order; dim 0 may differ per rank
    /// (including 0 rows), the other dims and the kind must agree (checked: mismatch is an error naming the rank).
    fn all_gather_cat(&mut self, t: &tch::Tensor) -> Result<tch::Tensor, CommError>;
    /// In-place: every rank ends with root's values (shape and kind must agree; a non-root rank whose
    /// tensor differs gets `Mismatch`, the root does not learn of it).
    fn broadcast(&mut self, t: &mut tch::Tensor, root: usize) -> Result<(), CommError>;
    fn barrier(&mut self) -> Result<(), CommError>;
}
