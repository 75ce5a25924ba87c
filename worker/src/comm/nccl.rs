//! NCCL backend: [`NcclCommunicator`], the [`Communicator`] for CUDA tensors, one GPU per rank.
//!
//! # Layout
//! - this file: the public entry points ([`nccl_available`], [`nccl_unique_id`], [`connect_nccl`]) and
//!   the collectives;
//! - `ffi`: the only code that calls NCCL and the CUDA runtime (loading, typed function table,
//!   communicator handle, events);
//! - `search`: where `libnccl.so.2` is looked for (pure);
//! - `plan`: the header exchange that makes ranks agree before each collective, and the padded
//!   layouts of uneven gathers and scatters (pure);
//! - `wait`: the polling loop with its timeout and abort checks (pure, fake-clock tested);
//! - `check`: [`self_check`], the one-GPU check behind `hcmoco-worker nccl-check`.
//!
//! # Loading
//! Nothing about CUDA is linked: cudarc (feature `dynamic-loading`) and `libloading` open the libraries
//! at run time, so the crate builds and its CPU tests run anywhere. NCCL is opened by full path (see
//! `search` for why and where); the CUDA runtime and driver through cudarc's loader after its
//! `is_culib_present()` checks. A missing library or device is `CommError::Unsupported` naming what is
//! missing and where it was looked for, never a panic.
//!
//! # Ordering with libtorch
//! NCCL calls go to the legacy default stream (handle 0), which is libtorch's default stream (the worker
//! never sets another current stream): an NCCL kernel starts after the libtorch kernels queued before it,
//! and kernels queued after the call start after it, with no device synchronisation. The call then waits
//! on the host, polling, until the collective has finished (as the CPU backend's calls block), so results
//! are visible to any stream on return. The agreement header (below) goes up from pinned memory without
//! blocking, so the host does not wait for earlier libtorch work before the first NCCL call is queued;
//! it does wait for the header exchange before queueing the data collective. `self_check` measures what a
//! device synchronisation around each collective would cost instead.
//!
//! # Failing fast
//! The communicator is created non-blocking (`ncclCommInitRankConfig`, `blocking = 0`). Every wait
//! (set-up, each collective, finalize) polls `ncclCommGetAsyncError` and a CUDA event without ever
//! blocking in NCCL or CUDA, checks the abort flag of the communicator's `AbortHandle`, and charges the
//! time to `timeout` (time spent behind earlier libtorch work on the stream is not charged). A timeout,
//! an NCCL error (a dead peer shows up as `ncclRemoteError`/`ncclSystemError`) or an abort request
//! aborts the communicator (`ncclCommAbort`, which also stops its kernels) and returns
//! `CommError::Aborted`; later calls return `Poisoned` (or `Aborted` again after an abort request).
//!
//! # Agreement
//! NCCL trusts its caller, so each collective first all-gathers a small header (collective, kind,
//! count or shape, root): mismatches become `Mismatch`/`Protocol` errors on every rank, and a rank
//! that rejects its input (a CPU tensor, an unsupported kind) still takes part in that exchange so its
//! peers fail at once instead of timing out. Cost: one 104-byte all-gather per collective and two tiny
//! host copies (measured by `self_check` as the barrier latency).

#![allow(unsafe_code)]

use std::ffi::c_int;
use std::sync::Arc;
use std::time::Duration;

use cudarc::nccl::sys::{ncclDataType_t, ncclRedOp_t};
use tch::{Device, Kind, Tensor};

use self::ffi::{Event, NCCL_IN_PROGRESS, RawComm, UNIQUE_ID_BYTES};
use self::plan::{Disagreement, HEADER_LEN, Header, OpCode};
use self::wait::{AbortState, Probe, Progress, SystemClock, WaitError};
use super::{AbortHandle, CommError, Communicator, ReduceOp};

mod check;
mod ffi;
mod plan;
mod search;
mod wait;

#[cfg(test)]
mod tests;

pub use check::self_check;

/// Whether NCCL can be used in this process: the NCCL library, the CUDA runtime and driver libraries,
/// and at least one CUDA device. `Err` says what is missing and where it was looked for.
pub fn nccl_available() -> Result<(), String> {
    usable_runtime().map(|_| ())
}

/// NCCL and the number of CUDA devices, or why NCCL cannot be used.
fn usable_runtime() -> Result<(&'static ffi::NcclApi, usize), String> {
    let api = ffi::nccl_api().map_err(|e| format!("NCCL cannot be used here: {e}"))?;
    let found = format!("NCCL {} was found: {}", ffi::version_string(api.version), api.source);
    ffi::cuda_libraries().map_err(|e| format!("NCCL cannot be used here: {e} ({found})"))?;
    let devices =
        ffi::device_count().map_err(|e| format!("NCCL cannot be used here: no CUDA device: {e} ({found})"))?;
    if devices == 0 {
        return Err(format!(
            "NCCL cannot be used here: no CUDA device is visible (CUDA_VISIBLE_DEVICES={:?}) ({found})",
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
        ));
    }
    Ok((api, devices))
}

/// A new NCCL unique id, for rank 0 to hand to every rank as the rendezvous' opaque
/// `collective_bootstrap` bytes (128 of them). It also starts NCCL's bootstrap listener in this
/// process, so the process that creates it must be the one that connects as rank 0; a new
/// generation needs a new id.
pub fn nccl_unique_id() -> Result<Vec<u8>, CommError> {
    const OP: &str = "nccl_unique_id";
    let (api, _) = usable_runtime().map_err(|detail| CommError::Unsupported { op: OP, detail })?;
    api.unique_id().map(|id| id.to_vec()).map_err(|e| CommError::Local { op: OP, source: std::io::Error::other(e) })
}

/// Joins the NCCL communicator of one generation as `rank` of `world_size`, on CUDA device
/// `device_index`, with the unique id rank 0 made (`bootstrap`). Set-up that does not finish within
/// `timeout` (a peer missing) is aborted and returns `CommError::Aborted`.
pub fn connect_nccl(
    rank: usize,
    world_size: usize,
    generation: u64,
    bootstrap: &[u8],
    device_index: usize,
    timeout: Duration,
) -> Result<NcclCommunicator, CommError> {
    const OP: &str = "connect";
    let id = validate_connect(rank, world_size, bootstrap, timeout)?;
    let (api, devices) = usable_runtime().map_err(|detail| CommError::Unsupported { op: OP, detail })?;
    if device_index >= devices {
        return Err(CommError::InvalidArgument {
            op: OP,
            detail: format!("cuda device {device_index} does not exist: {devices} visible"),
        });
    }
    let unsupported = |e: String| CommError::Unsupported { op: OP, detail: format!("cuda device {device_index}: {e}") };
    ffi::set_device(device_index).map_err(unsupported)?;
    let ready = Event::new().map_err(unsupported)?;
    let done = Event::new().map_err(unsupported)?;
    let who = format!("rank {rank} of {world_size} (generation {generation})");
    let comm = RawComm::init(api, world_size, &id, rank)
        .map_err(|e| CommError::Aborted { op: OP, reason: format!("{who}: NCCL set-up failed: {e}") })?;
    // Nobody holds an `AbortHandle` yet: set-up is bounded by the timeout alone.
    let waited = wait::wait(&mut AsyncProbe(&comm), &AbortState::default(), timeout, &SystemClock::new());
    if let Err(e) = waited {
        comm.abort();
        let reason = match e {
            WaitError::TimedOut { charged } => format!(
                "{who}: NCCL set-up did not finish within {charged:?}: a peer is missing, unreachable, or \
                 joined with another unique id; set-up aborted"
            ),
            WaitError::Failed(e) | WaitError::Aborted(e) => format!("{who}: NCCL set-up failed: {e}"),
        };
        return Err(CommError::Aborted { op: OP, reason });
    }
    Ok(NcclCommunicator {
        comm: Some(comm),
        ready,
        done,
        rank,
        world_size,
        generation,
        device_index,
        timeout,
        abort: Arc::default(),
        failure: None,
    })
}

/// Argument checks of `connect_nccl`, before anything is loaded.
fn validate_connect(
    rank: usize,
    world_size: usize,
    bootstrap: &[u8],
    timeout: Duration,
) -> Result<[u8; UNIQUE_ID_BYTES], CommError> {
    let invalid = |detail: String| CommError::InvalidArgument { op: "connect", detail };
    if world_size == 0 || rank >= world_size {
        return Err(invalid(format!("rank {rank} is not a rank of a world of {world_size}")));
    }
    if timeout.is_zero() {
        return Err(invalid("the timeout is zero".to_owned()));
    }
    <[u8; UNIQUE_ID_BYTES]>::try_from(bootstrap).map_err(|_| {
        invalid(format!(
            "the collective bootstrap holds {} bytes; an NCCL unique id (rank 0's nccl_unique_id) holds {UNIQUE_ID_BYTES}",
            bootstrap.len()
        ))
    })
}

/// Collectives on CUDA tensors of one device through an NCCL communicator (see the module docs).
#[derive(Debug)]
pub struct NcclCommunicator {
    /// `None` once aborted.
    comm: Option<RawComm>,
    /// Recorded before each NCCL call: when it completes, earlier work on the stream is done.
    ready: Event,
    /// Recorded after each NCCL call: when it completes, so is the collective.
    done: Event,
    rank: usize,
    world_size: usize,
    generation: u64,
    device_index: usize,
    timeout: Duration,
    abort: Arc<AbortState>,
    /// Why the communicator was aborted after a failure.
    failure: Option<String>,
}

impl NcclCommunicator {
    pub fn device_index(&self) -> usize {
        self.device_index
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `Ok` unless aborted or failed earlier.
    fn ensure_usable(&mut self, op: &'static str) -> Result<(), CommError> {
        if let Some(reason) = self.abort.reason() {
            if let Some(comm) = self.comm.take() {
                comm.abort();
            }
            return Err(CommError::Aborted { op, reason });
        }
        match (&self.failure, &self.comm) {
            (Some(cause), _) => Err(CommError::Poisoned { op, cause: cause.clone() }),
            (None, None) => Err(CommError::Poisoned { op, cause: "the communicator was torn down".to_owned() }),
            (None, Some(_)) => Ok(()),
        }
    }

    /// Aborts the communicator after a failure; later calls get `Poisoned`.
    fn fail(&mut self, op: &'static str, reason: String) -> CommError {
        if let Some(comm) = self.comm.take() {
            comm.abort();
        }
        self.failure = Some(format!("{op}: {reason}"));
        CommError::Aborted { op, reason }
    }

    /// Enqueues one NCCL call (`call`, which must use the legacy default stream) and waits until it
    /// has finished, failed, timed out or was aborted.
    fn run(&mut self, op: &'static str, call: impl FnOnce(&RawComm) -> ffi::NcclResult) -> Result<(), CommError> {
        self.ensure_usable(op)?;
        let outcome = self.enqueue_and_wait(call);
        outcome.map_err(|reason| self.fail(op, reason))
    }

    fn enqueue_and_wait(&self, call: impl FnOnce(&RawComm) -> ffi::NcclResult) -> Result<(), String> {
        let comm = self.comm.as_ref().ok_or("the communicator was torn down")?;
        ffi::set_device(self.device_index)?;
        self.ready.record()?;
        comm.check("the NCCL call", call(comm))?;
        let mut probe = CollectiveProbe { comm, ready: &self.ready, done: &self.done, enqueued: false, started: false };
        wait::wait(&mut probe, &self.abort, self.timeout, &SystemClock::new()).map_err(|e| match e {
            WaitError::Aborted(reason) => reason,
            WaitError::TimedOut { charged } => format!(
                "no completion after {charged:?} (timeout {:?}) on rank {} of {}, generation {}: a peer is dead, \
                 stuck, or called another collective; the NCCL communicator was aborted",
                self.timeout, self.rank, self.world_size, self.generation
            ),
            WaitError::Failed(e) => format!("{e}; the NCCL communicator was aborted"),
        })
    }

    /// All-gathers the ranks' headers (this rank's, or a rejection if `local` is an error) and returns
    /// them in rank order; `local`'s own error wins on this rank.
    fn agree(
        &mut self,
        op: &'static str,
        code: OpCode,
        local: Result<Header, CommError>,
    ) -> Result<Vec<Header>, CommError> {
        let header = local.as_ref().map_or_else(|_| Header::rejected(code), Clone::clone);
        let headers = self.exchange(op, &header)?;
        local?;
        Ok(headers)
    }

    fn exchange(&mut self, op: &'static str, header: &Header) -> Result<Vec<Header>, CommError> {
        let tensor_error = |source| CommError::Tensor { op, source };
        let device = Device::Cuda(self.device_index);
        let len = self.world_size * HEADER_LEN;
        // Non-blocking: a blocking host-to-device copy would synchronise libtorch's stream before every
        // collective and undo the stream ordering. From pageable memory, CUDA stages the 64 bytes before
        // the call returns, so the source may go at once. (Not pinned: tch's pin_memory passes the
        // deprecated device argument, and libtorch warns on every call.)
        let local = Tensor::f_from_slice(&header.encode())
            .and_then(|t| t.f_to_device_(device, Kind::Int64, true, false))
            .map_err(tensor_error)?;
        let all = Tensor::f_empty([len as i64], (Kind::Int64, device)).map_err(tensor_error)?;
        let (send, recv) = (local.data_ptr(), all.data_ptr());
        // SAFETY: `local` holds HEADER_LEN i64s and `all` world_size times as many, both on the
        // communicator's device; both live until `run` has waited for the collective to finish.
        self.run(op, |comm| unsafe { comm.all_gather(send, recv, HEADER_LEN * 8) })?;
        // The stream is idle up to the gather by now, so this blocking copy waits for nothing else.
        let mut raw = vec![0i64; len];
        all.f_to_device(Device::Cpu).and_then(|t| t.f_copy_data(&mut raw, len)).map_err(tensor_error)?;
        raw.chunks(HEADER_LEN)
            .enumerate()
            .map(|(rank, h)| Header::decode(h).map_err(|detail| CommError::Protocol { op, peer_rank: rank, detail }))
            .collect()
    }
}

/// Set-up and finalize: done when `ncclCommGetAsyncError` leaves `ncclInProgress`.
struct AsyncProbe<'a>(&'a RawComm);

impl Probe for AsyncProbe<'_> {
    fn poll(&mut self) -> Result<Progress, String> {
        Ok(if self.0.async_state()? == NCCL_IN_PROGRESS { Progress::Running } else { Progress::Done })
    }
}

/// One collective: enqueued once `ncclCommGetAsyncError` leaves `ncclInProgress` (only then is its
/// kernel on the stream, and the `done` event recorded after it); started once `ready` completes.
struct CollectiveProbe<'a> {
    comm: &'a RawComm,
    ready: &'a Event,
    done: &'a Event,
    enqueued: bool,
    started: bool,
}

impl Probe for CollectiveProbe<'_> {
    fn poll(&mut self) -> Result<Progress, String> {
        let state = self.comm.async_state()?;
        if !self.enqueued {
            if state == NCCL_IN_PROGRESS {
                return Ok(Progress::Running);
            }
            self.done.record()?;
            self.enqueued = true;
        }
        if !self.started {
            if !self.ready.is_done()? {
                return Ok(Progress::Queued);
            }
            self.started = true;
        }
        Ok(if self.done.is_done()? { Progress::Done } else { Progress::Running })
    }
}

fn disagreement(op: &'static str, d: Disagreement) -> CommError {
    match d {
        Disagreement::Order { rank, detail } => CommError::Protocol { op, peer_rank: rank, detail },
        Disagreement::Mismatch { rank, detail } => CommError::Mismatch { op, rank, detail },
    }
}

/// The tensor lives on this communicator's device; for reductions, its kind is reducible.
fn check_tensor(op: &'static str, t: &Tensor, device_index: usize, reduction: bool) -> Result<(), CommError> {
    match t.device() {
        Device::Cuda(i) if i == device_index => {}
        Device::Cuda(i) => {
            return Err(CommError::InvalidArgument {
                op,
                detail: format!("tensor on cuda:{i}; this communicator works on cuda:{device_index}"),
            });
        }
        other => {
            return Err(CommError::Unsupported {
                op,
                detail: format!(
                    "tensor on {other:?}; the NCCL communicator handles CUDA tensors (cuda:{device_index}) only"
                ),
            });
        }
    }
    if t.is_sparse() {
        return Err(CommError::Unsupported { op, detail: "sparse tensor".to_owned() });
    }
    if reduction && reduce_dtype(t.kind()).is_none() {
        return Err(CommError::Unsupported {
            op,
            detail: format!("tensor kind {:?} (Float, Double and BFloat16 are reduced)", t.kind()),
        });
    }
    Ok(())
}

/// NCCL's type for a reducible kind. NCCL picks its own algorithm (ring or tree) and summation order,
/// so float and bf16 results can differ from the CPU backend's in the last bits (they are still
/// identical on every rank).
fn reduce_dtype(kind: Kind) -> Option<ncclDataType_t> {
    match kind {
        Kind::Float => Some(ncclDataType_t::ncclFloat32),
        Kind::Double => Some(ncclDataType_t::ncclFloat64),
        Kind::BFloat16 => Some(ncclDataType_t::ncclBfloat16),
        _ => None,
    }
}

fn reduce_op(op: ReduceOp) -> ncclRedOp_t {
    match op {
        ReduceOp::Sum => ncclRedOp_t::ncclSum,
        ReduceOp::Average => ncclRedOp_t::ncclAvg,
    }
}

/// The header of a reduction (`numel` compared, shape not).
fn reduction_header(
    op: &'static str,
    code: OpCode,
    t: &Tensor,
    device_index: usize,
    reduce: ReduceOp,
) -> Result<Header, CommError> {
    check_tensor(op, t, device_index, true)?;
    Header::new(code, Some(t.kind()), reduce_op(reduce) as i64, t.numel() as i64, &[])
        .map_err(|detail| CommError::InvalidArgument { op, detail })
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn abort_handle(&self) -> AbortHandle {
        let state = self.abort.clone();
        AbortHandle::new(move |reason| state.request(reason))
    }

    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        const OP: &str = "all_reduce";
        self.ensure_usable(OP)?;
        let local = reduction_header(OP, OpCode::AllReduce, t, self.device_index, op);
        let headers = self.agree(OP, OpCode::AllReduce, local)?;
        plan::check_reduce(&headers).map_err(|d| disagreement(OP, d))?;
        let (Some(dtype), count) = (reduce_dtype(t.kind()), t.numel()) else {
            return Err(CommError::Unsupported { op: OP, detail: format!("tensor kind {:?}", t.kind()) });
        };
        if count == 0 {
            return Ok(());
        }
        let tensor_error = |source| CommError::Tensor { op: OP, source };
        let work = t.f_contiguous().map_err(tensor_error)?;
        let (buf, red) = (work.data_ptr(), reduce_op(op));
        // SAFETY: `work` is a contiguous tensor of `count` elements of `dtype` on the communicator's
        // device (checked), alive until `run` has waited for the collective to finish.
        self.run(OP, |comm| unsafe { comm.all_reduce(buf, count, dtype, red) })?;
        if !t.is_contiguous() {
            tch::no_grad(|| t.f_copy_(&work)).map_err(tensor_error)?;
        }
        Ok(())
    }

    fn reduce_scatter(&mut self, t: &Tensor, op: ReduceOp) -> Result<Tensor, CommError> {
        const OP: &str = "reduce_scatter";
        self.ensure_usable(OP)?;
        let local = reduction_header(OP, OpCode::ReduceScatter, t, self.device_index, op);
        let headers = self.agree(OP, OpCode::ReduceScatter, local)?;
        plan::check_reduce(&headers).map_err(|d| disagreement(OP, d))?;
        let (kind, numel) = (t.kind(), t.numel());
        let Some(dtype) = reduce_dtype(kind) else {
            return Err(CommError::Unsupported { op: OP, detail: format!("tensor kind {kind:?}") });
        };
        let device = Device::Cuda(self.device_index);
        let tensor_error = |source| CommError::Tensor { op: OP, source };
        let mine = super::chunk_range(numel, self.world_size, self.rank);
        let (padded, chunks) = plan::scatter_layout(numel, self.world_size);
        if padded == 0 {
            return Tensor::f_zeros([0], (kind, device)).map_err(tensor_error);
        }
        let world = self.world_size;
        let (send, recv) = tch::no_grad(|| -> Result<(Tensor, Tensor), tch::TchError> {
            let flat = t.f_contiguous()?.f_reshape([-1])?;
            let send = match &chunks {
                None => flat,
                Some(chunks) => {
                    let buf = Tensor::f_zeros([(world * padded) as i64], (kind, device))?;
                    for (r, c) in chunks.iter().enumerate().filter(|(_, c)| !c.is_empty()) {
                        buf.f_narrow(0, (r * padded) as i64, c.len() as i64)?.f_copy_(&flat.f_narrow(
                            0,
                            c.start as i64,
                            c.len() as i64,
                        )?)?;
                    }
                    buf
                }
            };
            Ok((send, Tensor::f_empty([padded as i64], (kind, device))?))
        })
        .map_err(tensor_error)?;
        let (send_ptr, recv_ptr, red) = (send.data_ptr(), recv.data_ptr(), reduce_op(op));
        // SAFETY: `send` holds world * padded elements and `recv` padded elements of `dtype`, contiguous,
        // on the communicator's device, alive until `run` has waited for the collective to finish.
        self.run(OP, |comm| unsafe { comm.reduce_scatter(send_ptr, recv_ptr, padded, dtype, red) })?;
        recv.f_narrow(0, 0, mine.len() as i64).map_err(tensor_error)
    }

    fn all_gather_cat(&mut self, t: &Tensor) -> Result<Tensor, CommError> {
        const OP: &str = "all_gather_cat";
        self.ensure_usable(OP)?;
        let local = check_tensor(OP, t, self.device_index, false).and_then(|()| {
            if t.dim() == 0 {
                return Err(CommError::InvalidArgument {
                    op: OP,
                    detail: "a 0-dim tensor has no dim 0 to concatenate along".to_owned(),
                });
            }
            Header::new(OpCode::AllGatherCat, Some(t.kind()), 0, t.numel() as i64, &t.size())
                .map_err(|detail| CommError::InvalidArgument { op: OP, detail })
        });
        let headers = self.agree(OP, OpCode::AllGatherCat, local)?;
        let plan = plan::plan_gather(&headers).map_err(|d| disagreement(OP, d))?;
        let (kind, device) = (t.kind(), Device::Cuda(self.device_index));
        let tensor_error = |source| CommError::Tensor { op: OP, source };
        let row_bytes = plan.trailing.iter().product::<i64>() as usize * kind.elt_size_in_bytes();
        if plan.max_rows == 0 || row_bytes == 0 {
            return Tensor::f_zeros(plan.output_dims(), (kind, device)).map_err(tensor_error);
        }
        let padded_dims = |rows: i64| std::iter::once(rows).chain(plan.trailing.iter().copied()).collect::<Vec<i64>>();
        let (send, gathered) = tch::no_grad(|| -> Result<(Tensor, Tensor), tch::TchError> {
            let src = t.f_contiguous()?;
            let send = if plan.uniform() {
                src
            } else {
                let buf = Tensor::f_empty(padded_dims(plan.max_rows), (kind, device))?;
                let own = plan.rows[self.rank];
                if own > 0 {
                    buf.f_narrow(0, 0, own)?.f_copy_(&src)?;
                }
                buf
            };
            let gathered = Tensor::f_empty(padded_dims(plan.max_rows * self.world_size as i64), (kind, device))?;
            Ok((send, gathered))
        })
        .map_err(tensor_error)?;
        let (send_ptr, recv_ptr) = (send.data_ptr(), gathered.data_ptr());
        let bytes = plan.max_rows as usize * row_bytes;
        // SAFETY: `send` holds max_rows rows (`bytes` bytes) and `gathered` world_size times as many,
        // contiguous, on the communicator's device, alive until `run` has waited for the collective.
        self.run(OP, |comm| unsafe { comm.all_gather(send_ptr, recv_ptr, bytes) })?;
        if plan.uniform() {
            return Ok(gathered);
        }
        let parts = plan
            .segments()
            .into_iter()
            .map(|(start, rows)| gathered.f_narrow(0, start, rows))
            .collect::<Result<Vec<_>, _>>()
            .map_err(tensor_error)?;
        Tensor::f_cat(&parts, 0).map_err(tensor_error)
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
        const OP: &str = "broadcast";
        self.ensure_usable(OP)?;
        let world = self.world_size;
        let local = check_tensor(OP, t, self.device_index, false).and_then(|()| {
            if root >= world {
                return Err(CommError::InvalidArgument {
                    op: OP,
                    detail: format!("root {root} is not a rank of {world}"),
                });
            }
            Header::new(OpCode::Broadcast, Some(t.kind()), root as i64, t.numel() as i64, &t.size())
                .map_err(|detail| CommError::InvalidArgument { op: OP, detail })
        });
        let headers = self.agree(OP, OpCode::Broadcast, local)?;
        let root = plan::check_broadcast(&headers).map_err(|d| disagreement(OP, d))?;
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        if bytes == 0 {
            return Ok(());
        }
        let tensor_error = |source| CommError::Tensor { op: OP, source };
        let work = t.f_contiguous().map_err(tensor_error)?;
        let buf = work.data_ptr();
        let root = c_int::try_from(root)
            .map_err(|_| CommError::InvalidArgument { op: OP, detail: "root too large".to_owned() })?;
        // SAFETY: `work` holds `bytes` contiguous bytes on the communicator's device, alive until `run`
        // has waited for the collective to finish.
        self.run(OP, |comm| unsafe { comm.broadcast(buf, bytes, root) })?;
        if !t.is_contiguous() {
            tch::no_grad(|| t.f_copy_(&work)).map_err(tensor_error)?;
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        const OP: &str = "barrier";
        self.ensure_usable(OP)?;
        let header = Header::new(OpCode::Barrier, None, 0, 0, &[])
            .map_err(|detail| CommError::InvalidArgument { op: OP, detail });
        let headers = self.agree(OP, OpCode::Barrier, header)?;
        plan::check_order(&headers).map_err(|d| disagreement(OP, d))
    }
}

impl Drop for NcclCommunicator {
    /// Healthy: `ncclCommFinalize`, polled within the timeout, then `ncclCommDestroy`. After a failure
    /// or an abort request, or when finalize fails or times out: `ncclCommAbort`, which never waits for
    /// peers.
    fn drop(&mut self) {
        let Some(comm) = self.comm.take() else { return };
        if self.failure.is_some() || self.abort.reason().is_some() || ffi::set_device(self.device_index).is_err() {
            comm.abort();
            return;
        }
        if comm.check("ncclCommFinalize", comm.finalize()).is_err() {
            comm.abort();
            return;
        }
        let finalized = wait::wait(&mut AsyncProbe(&comm), &self.abort, self.timeout, &SystemClock::new());
        match finalized {
            Ok(()) => {
                let _ = comm.destroy();
            }
            Err(e) => {
                tracing::warn!(rank = self.rank, generation = self.generation, error = ?e, "nccl finalize failed; aborting the communicator");
                comm.abort();
            }
        }
    }
}
