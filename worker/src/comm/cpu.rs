//! `CpuCommunicator`: the `Communicator` over a `TcpRing`, for CPU tensors. Data is copied out of the
//! tensor into a host buffer, the ring collective runs, and the result is copied back under
//! `no_grad`.

use std::net::TcpListener;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use super::error::CommError;
use super::meta::{TensorMeta, is_transferable};
use super::tcp::{Element, TcpRing};
use super::{AbortHandle, Communicator, ReduceOp};

/// Collectives on CPU tensors over a ring of TCP connections.
#[derive(Debug)]
pub struct CpuCommunicator {
    ring: TcpRing,
    /// Set by an `AbortHandle`; checked before every collective.
    aborted: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

/// Forms the ring (`TcpRing::connect`) and wraps it.
pub fn connect_cpu(
    listener: TcpListener,
    rank: usize,
    peers: &[String],
    generation: u64,
    timeout: Duration,
) -> Result<CpuCommunicator, CommError> {
    TcpRing::connect(listener, rank, peers, generation, timeout).map(CpuCommunicator::new)
}

impl CpuCommunicator {
    pub fn new(ring: TcpRing) -> Self {
        CpuCommunicator { ring, aborted: Default::default() }
    }

    fn check_aborted(&self, op: &'static str) -> Result<(), CommError> {
        match self.aborted.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(reason) => Err(CommError::Aborted { op, reason: reason.clone() }),
            None => Ok(()),
        }
    }

    /// The ring, for byte-level collectives (e.g. gathering serialized metadata).
    pub fn ring_mut(&mut self) -> &mut TcpRing {
        &mut self.ring
    }

    pub fn into_ring(self) -> TcpRing {
        self.ring
    }

    fn all_reduce_typed<T: Element + tch::kind::Element>(
        &mut self,
        op: &'static str,
        t: &mut Tensor,
    ) -> Result<(), CommError> {
        let tensor_error = |source| CommError::Tensor { op, source };
        let numel = t.numel();
        let mut values = vec![T::zeroed(); numel];
        t.f_copy_data(&mut values, numel).map_err(tensor_error)?;
        self.ring.all_reduce_sum_as(op, &mut values)?;
        let summed =
            Tensor::f_from_slice(&values).and_then(|flat| flat.f_view(t.size().as_slice())).map_err(tensor_error)?;
        tch::no_grad(|| t.f_copy_(&summed)).map_err(tensor_error)
    }
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
        let aborted = self.aborted.clone();
        AbortHandle::new(move |reason| {
            aborted.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| reason.to_string());
        })
    }

    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        const OP: &str = "all_reduce";
        self.check_aborted(OP)?;
        check_cpu(OP, t)?;
        match t.kind() {
            Kind::Float => self.all_reduce_typed::<f32>(OP, t)?,
            Kind::Double => self.all_reduce_typed::<f64>(OP, t)?,
            kind => {
                return Err(CommError::Unsupported {
                    op: OP,
                    detail: format!("tensor kind {kind:?} (Float and Double are summed)"),
                });
            }
        }
        if op == ReduceOp::Average {
            let w = self.world_size() as f64;
            let _ = tch::no_grad(|| t.f_div_scalar_(w)).map_err(|source| CommError::Tensor { op: OP, source })?;
        }
        Ok(())
    }

    fn reduce_scatter(&mut self, t: &Tensor, op: ReduceOp) -> Result<Tensor, CommError> {
        const OP: &str = "reduce_scatter";
        let mut flat = t
            .f_contiguous()
            .and_then(|c| c.f_reshape([-1]))
            .map_err(|source| CommError::Tensor { op: OP, source })?
            .copy();
        self.all_reduce(&mut flat, op)?;
        let r = super::ring::chunk_range(flat.numel(), self.world_size(), self.rank());
        Ok(flat.narrow(0, r.start as i64, (r.end - r.start) as i64))
    }

    fn all_gather_cat(&mut self, t: &Tensor) -> Result<Tensor, CommError> {
        const OP: &str = "all_gather_cat";
        self.check_aborted(OP)?;
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
        self.check_aborted(OP)?;
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
        self.check_aborted("barrier")?;
        self.ring.barrier()
    }
}

#[cfg(test)]
mod tests;
