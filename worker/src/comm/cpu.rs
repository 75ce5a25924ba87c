//! `CpuCommunicator`: the `Communicator` for CPU tensors over a `TcpRing` (tcp between hosts, shared
//! memory between ranks on one host). Reductions run straight on the tensor's memory when it is
//! dense and contiguous (otherwise on a contiguous copy that is written back under `no_grad`); gathers
//! and broadcasts travel with a kind-and-shape header (`meta`).

use std::net::TcpListener;
use std::time::Duration;

use half::bf16;
use tch::{Device, Kind, Tensor};

use super::element::Element;
use super::error::CommError;
use super::meta::{TensorMeta, is_transferable};
use super::options::{CpuOptions, PeerInfo, Transport};
use super::tcp::TcpRing;
use super::tensor_mem::{is_viewable, with_elems, with_elems_mut};
use super::{AbortHandle, Communicator, ReduceOp};

/// Collectives on CPU tensors over a ring of tcp and shared-memory links.
#[derive(Debug)]
pub struct CpuCommunicator {
    ring: TcpRing,
}

/// Forms the ring with tcp for all data (`TcpRing::connect`) and wraps it. Prefer `connect_cpu_with`,
/// which uses shared memory between ranks on the same host.
pub fn connect_cpu(
    listener: TcpListener,
    rank: usize,
    peers: &[String],
    generation: u64,
    timeout: Duration,
) -> Result<CpuCommunicator, CommError> {
    TcpRing::connect(listener, rank, peers, generation, timeout).map(CpuCommunicator::new)
}

/// Forms the ring (`TcpRing::connect_with`): `peers[i]` is rank i's collective address and host, as
/// the rendezvous hands them out; `opts.transport` picks the data transport of each link.
pub fn connect_cpu_with(
    listener: impl std::borrow::Borrow<TcpListener>,
    rank: usize,
    peers: &[PeerInfo],
    generation: u64,
    opts: &CpuOptions,
) -> Result<CpuCommunicator, CommError> {
    TcpRing::connect_with(listener, rank, peers, generation, opts).map(CpuCommunicator::new)
}

/// A world of one: the same ring code with no neighbour, on a loopback listener of its own (a
/// single-process step, `loss-eval`, benchmarks, tests).
pub fn connect_cpu_alone(opts: &CpuOptions) -> Result<CpuCommunicator, CommError> {
    let local = |source| CommError::Local { op: "bind a loopback listener", source };
    let listener = TcpListener::bind("127.0.0.1:0").map_err(local)?;
    let addr = listener.local_addr().map_err(local)?.to_string();
    connect_cpu_with(listener, 0, &[PeerInfo { addr, host_id: "alone".into() }], 1, opts)
}

impl CpuCommunicator {
    pub fn new(ring: TcpRing) -> Self {
        CpuCommunicator { ring }
    }

    /// The ring, for byte-level collectives (e.g. gathering serialized metadata).
    pub fn ring_mut(&mut self) -> &mut TcpRing {
        &mut self.ring
    }

    pub fn into_ring(self) -> TcpRing {
        self.ring
    }

    /// How data flows (to the left neighbour, to the right one); `None` for a world of one.
    pub fn transports(&self) -> Option<(Transport, Transport)> {
        self.ring.transports()
    }

    fn all_reduce_typed<T: Element>(
        &mut self,
        op: &'static str,
        t: &mut Tensor,
        kind: Kind,
        reduce: ReduceOp,
    ) -> Result<(), CommError> {
        let ring = &mut self.ring;
        if let Some(result) = with_elems_mut::<T, _>(t, kind, |buf| ring.all_reduce_as(op, buf, reduce)) {
            return result;
        }
        // Not viewable in place (e.g. transposed): reduce a dense copy and write it back.
        let mut dense = dense_copy(op, t)?;
        with_elems_mut::<T, _>(&mut dense, kind, |buf| ring.all_reduce_as(op, buf, reduce))
            .ok_or_else(|| not_viewable(op))??;
        tch::no_grad(|| t.f_copy_(&dense)).map_err(|source| CommError::Tensor { op, source })
    }

    fn reduce_scatter_typed<T: Element>(
        &mut self,
        op: &'static str,
        t: &Tensor,
        kind: Kind,
        reduce: ReduceOp,
    ) -> Result<Tensor, CommError> {
        let dense;
        let input = if is_viewable::<T>(t, kind) {
            t
        } else {
            dense = dense_copy(op, t)?;
            &dense
        };
        let range = super::ring::chunk_range(input.numel(), self.ring.world_size(), self.ring.rank());
        let mut out = Tensor::f_empty([range.len() as i64], (kind, Device::Cpu))
            .map_err(|source| CommError::Tensor { op, source })?;
        let ring = &mut self.ring;
        with_elems::<T, _>(input, kind, |src| {
            with_elems_mut::<T, _>(&mut out, kind, |dst| ring.reduce_scatter_as(op, src, dst, reduce))
        })
        .flatten()
        .ok_or_else(|| not_viewable(op))??;
        Ok(out)
    }
}

/// A dense contiguous CPU copy of `t` (fresh memory, so always viewable).
fn dense_copy(op: &'static str, t: &Tensor) -> Result<Tensor, CommError> {
    let tensor_error = |source| CommError::Tensor { op, source };
    let mut dense = Tensor::f_empty(t.size(), (t.kind(), Device::Cpu)).map_err(tensor_error)?;
    tch::no_grad(|| dense.f_copy_(t)).map_err(tensor_error)?;
    Ok(dense)
}

fn not_viewable(op: &'static str) -> CommError {
    CommError::Unsupported { op, detail: "tensor memory cannot be accessed as dense elements".to_owned() }
}

/// Kinds the reductions handle.
fn reduce_kind_error(op: &'static str, kind: Kind) -> CommError {
    CommError::Unsupported { op, detail: format!("tensor kind {kind:?} (Float, Double and BFloat16 are reduced)") }
}

fn check_cpu(op: &'static str, t: &Tensor) -> Result<(), CommError> {
    match t.device() {
        Device::Cpu => Ok(()),
        device => Err(CommError::Unsupported {
            op,
            detail: format!("tensor on {device:?}; the tcp communicator handles cpu tensors only"),
        }),
    }
}

fn check_transferable(op: &'static str, t: &Tensor) -> Result<(), CommError> {
    check_cpu(op, t)?;
    if is_transferable(t.kind()) {
        Ok(())
    } else {
        Err(CommError::Unsupported { op, detail: format!("tensor kind {:?}", t.kind()) })
    }
}

fn describe(meta: &TensorMeta) -> String {
    format!("{:?} {:?}", meta.dims, meta.kind)
}

impl Communicator for CpuCommunicator {
    fn rank(&self) -> usize {
        self.ring.rank()
    }

    fn world_size(&self) -> usize {
        self.ring.world_size()
    }

    fn generation(&self) -> u64 {
        self.ring.generation()
    }

    fn abort_handle(&self) -> AbortHandle {
        self.ring.abort_handle()
    }

    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        const OP: &str = "all_reduce";
        check_cpu(OP, t)?;
        match t.kind() {
            Kind::Float => self.all_reduce_typed::<f32>(OP, t, Kind::Float, op),
            Kind::Double => self.all_reduce_typed::<f64>(OP, t, Kind::Double, op),
            Kind::BFloat16 => self.all_reduce_typed::<bf16>(OP, t, Kind::BFloat16, op),
            kind => Err(reduce_kind_error(OP, kind)),
        }
    }

    fn reduce_scatter(&mut self, t: &Tensor, op: ReduceOp) -> Result<Tensor, CommError> {
        const OP: &str = "reduce_scatter";
        check_cpu(OP, t)?;
        match t.kind() {
            Kind::Float => self.reduce_scatter_typed::<f32>(OP, t, Kind::Float, op),
            Kind::Double => self.reduce_scatter_typed::<f64>(OP, t, Kind::Double, op),
            Kind::BFloat16 => self.reduce_scatter_typed::<bf16>(OP, t, Kind::BFloat16, op),
            kind => Err(reduce_kind_error(OP, kind)),
        }
    }

    fn all_gather_cat(&mut self, t: &Tensor) -> Result<Tensor, CommError> {
        const OP: &str = "all_gather_cat";
        check_transferable(OP, t)?;
        if t.dim() == 0 {
            return Err(CommError::InvalidArgument {
                op: OP,
                detail: "a 0-dim tensor has no dim 0 to concatenate along".to_owned(),
            });
        }
        let local = TensorMeta::encode_tensor(t).map_err(|detail| CommError::InvalidArgument { op: OP, detail })?;
        let gathered = self.ring.all_gather_bytes_as(OP, &local)?;
        let parts = gathered
            .iter()
            .enumerate()
            .map(|(rank, bytes)| {
                TensorMeta::decode(bytes).map_err(|detail| CommError::Protocol { op: OP, peer_rank: rank, detail })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Every rank compares against rank 0, so all ranks report the same mismatch.
        let (reference, _) = &parts[0];
        for (rank, (meta, _)) in parts.iter().enumerate() {
            if meta.kind != reference.kind
                || meta.dims.len() != reference.dims.len()
                || meta.dims[1..] != reference.dims[1..]
            {
                return Err(CommError::Mismatch {
                    op: OP,
                    rank,
                    detail: format!(
                        "rank {rank} has {}, rank 0 has {} (all dims but the first, and the kind, must agree)",
                        describe(meta),
                        describe(reference)
                    ),
                });
            }
        }
        let rows: i64 = parts.iter().map(|(meta, _)| meta.dims[0]).sum();
        let mut dims = reference.dims.clone();
        dims[0] = rows;
        // Row-major data of tensors concatenated along dim 0 is the concatenation of their data.
        let mut data = Vec::with_capacity(parts.iter().map(|(_, data)| data.len()).sum());
        for (_, part) in &parts {
            data.extend_from_slice(part);
        }
        let out = TensorMeta { kind: reference.kind, dims };
        if out.data_len() != Some(data.len()) {
            return Err(CommError::InvalidArgument {
                op: OP,
                detail: format!("gathered shape {:?} is too large", out.dims),
            });
        }
        out.to_tensor(&data).map_err(|source| CommError::Tensor { op: OP, source })
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
        const OP: &str = "broadcast";
        check_transferable(OP, t)?;
        let rank = self.ring.rank();
        let mut bytes = if rank == root {
            TensorMeta::encode_tensor(t).map_err(|detail| CommError::InvalidArgument { op: OP, detail })?
        } else {
            Vec::new()
        };
        self.ring.broadcast_bytes_as(OP, &mut bytes, root)?;
        if rank == root {
            return Ok(());
        }
        let (meta, data) =
            TensorMeta::decode(&bytes).map_err(|detail| CommError::Protocol { op: OP, peer_rank: root, detail })?;
        let local = TensorMeta { kind: t.kind(), dims: t.size() };
        if meta != local {
            return Err(CommError::Mismatch {
                op: OP,
                rank,
                detail: format!("rank {rank} has {}, root {root} sent {}", describe(&local), describe(&meta)),
            });
        }
        let values = meta.to_tensor(data).map_err(|source| CommError::Tensor { op: OP, source })?;
        tch::no_grad(|| t.f_copy_(&values)).map_err(|source| CommError::Tensor { op: OP, source })
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.ring.barrier()
    }
}

#[cfg(test)]
mod tests;
