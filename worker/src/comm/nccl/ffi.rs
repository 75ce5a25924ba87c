//! The only place that calls into NCCL and the CUDA runtime.
//!
//! - NCCL: found by [`super::search`] and opened by full path with `libloading`; its functions are
//!   resolved into [`NcclApi`], typed with cudarc's NCCL 2.28 bindings (`cudarc::nccl::sys`). cudarc's
//!   own NCCL loader is never called: it only dlopens bare names it knows (not `libnccl.so.2`), and
//!   panics when none loads.
//! - CUDA runtime (`libcudart.so.13`, which PyPI torch's `libtorch_cuda.so` has already loaded) and the
//!   driver (`libcuda.so.1`, from the NVIDIA driver): used through cudarc's dynamic loader, after its
//!   `is_culib_present()` checks, so a missing library is an error, not a panic.
//!
//! Results cross the FFI boundary as `c_int`, never as a Rust enum, so a code this build does not
//! know (a newer NCCL) cannot be undefined behaviour.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId};
use cudarc::runtime::sys as cudart;

use super::search::{self, Candidate, SearchInputs};

pub(super) type NcclResult = c_int;
pub(super) const NCCL_SUCCESS: NcclResult = ncclResult_t::ncclSuccess as c_int;
pub(super) const NCCL_IN_PROGRESS: NcclResult = ncclResult_t::ncclInProgress as c_int;
/// `sizeof(ncclUniqueId)`.
pub(super) const UNIQUE_ID_BYTES: usize = 128;
/// `NCCL_VERSION(2, 28, 0)`: the `ncclConfig_t` layout of the bindings (feature `nccl-02028`).
const CONFIG_VERSION: u32 = 22800;
const CONFIG_MAGIC: u32 = 0xcafe_beef;
const CONFIG_UNDEF_INT: c_int = c_int::MIN;

type StreamT = cudarc::nccl::sys::cudaStream_t;
type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> NcclResult;
type GetUniqueIdFn = unsafe extern "C" fn(*mut ncclUniqueId) -> NcclResult;
type CommInitRankConfigFn =
    unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int, *mut ncclConfig_t) -> NcclResult;
type CommGetAsyncErrorFn = unsafe extern "C" fn(ncclComm_t, *mut NcclResult) -> NcclResult;
type CommFn = unsafe extern "C" fn(ncclComm_t) -> NcclResult;
type AllReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclRedOp_t,
    ncclComm_t,
    StreamT,
) -> NcclResult;
type AllGatherFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclComm_t, StreamT) -> NcclResult;
type BroadcastFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, c_int, ncclComm_t, StreamT) -> NcclResult;
type GetErrorStringFn = unsafe extern "C" fn(NcclResult) -> *const c_char;
type GetLastErrorFn = unsafe extern "C" fn(ncclComm_t) -> *const c_char;

/// The NCCL functions this backend calls, resolved from one loaded library.
pub(super) struct NcclApi {
    /// The file or name it was loaded from, and why it was picked.
    pub source: String,
    /// `ncclGetVersion`, e.g. 22809 for 2.28.9.
    pub version: i32,
    get_unique_id: GetUniqueIdFn,
    comm_init_rank_config: CommInitRankConfigFn,
    comm_get_async_error: CommGetAsyncErrorFn,
    comm_finalize: CommFn,
    comm_destroy: CommFn,
    comm_abort: CommFn,
    all_reduce: AllReduceFn,
    reduce_scatter: AllReduceFn,
    all_gather: AllGatherFn,
    broadcast: BroadcastFn,
    get_error_string: GetErrorStringFn,
    get_last_error: GetLastErrorFn,
    /// Keeps the function pointers above valid (the value lives in a static, never dropped).
    _library: libloading::Library,
}

impl std::fmt::Debug for NcclApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclApi").field("source", &self.source).field("version", &self.version).finish()
    }
}

/// "2.28.9" from 22809.
pub(super) fn version_string(code: i32) -> String {
    format!("{}.{}.{}", code / 10000, code % 10000 / 100, code % 100)
}

/// NCCL, loaded once per process.
pub(super) fn nccl_api() -> Result<&'static NcclApi, String> {
    static NCCL: OnceLock<Result<NcclApi, String>> = OnceLock::new();
    NCCL.get_or_init(|| load_nccl(&SearchInputs::from_process())).as_ref().map_err(Clone::clone)
}

fn load_nccl(inputs: &SearchInputs) -> Result<NcclApi, String> {
    let search = search::nccl_candidates(inputs);
    let mut failures = Vec::new();
    for candidate in &search.candidates {
        let opened = match candidate {
            // SAFETY: loading runs the library's initialisers; NCCL's are safe to run in any process,
            // and when libtorch already loaded this file dlopen just returns the same handle.
            Candidate::File { path, .. } => unsafe { libloading::Library::new(path) },
            // SAFETY: as above, for a file the system loader finds by NCCL's own names.
            Candidate::System { name } => unsafe { libloading::Library::new(*name) },
        };
        match opened {
            Ok(library) => return resolve(library, candidate.to_string()),
            Err(e) => failures.push(format!("{candidate}: {e}")),
        }
    }
    Err(search::not_found_message(&search, &failures))
}

fn resolve(library: libloading::Library, source: String) -> Result<NcclApi, String> {
    /// Copies the function pointer out of the library.
    ///
    /// # Safety
    /// `T` must be the C signature of `name` in NCCL 2.28's `nccl.h`.
    unsafe fn sym<T: Copy>(library: &libloading::Library, name: &str, source: &str) -> Result<T, String> {
        // SAFETY: the caller guarantees the type; the library outlives the copy (see `NcclApi`).
        unsafe { library.get::<T>(name.as_bytes()) }.map(|s| *s).map_err(|e| format!("{source}: no {name}: {e}"))
    }
    // SAFETY: each type below mirrors the declaration in nccl.h (2.28), as bound by cudarc.
    let api = unsafe {
        let get_version: GetVersionFn = sym(&library, "ncclGetVersion", &source)?;
        let mut version: c_int = 0;
        let code = get_version(&mut version);
        if code != NCCL_SUCCESS {
            return Err(format!("{source}: ncclGetVersion failed with code {code}"));
        }
        NcclApi {
            version,
            get_unique_id: sym(&library, "ncclGetUniqueId", &source)?,
            comm_init_rank_config: sym(&library, "ncclCommInitRankConfig", &source)?,
            comm_get_async_error: sym(&library, "ncclCommGetAsyncError", &source)?,
            comm_finalize: sym(&library, "ncclCommFinalize", &source)?,
            comm_destroy: sym(&library, "ncclCommDestroy", &source)?,
            comm_abort: sym(&library, "ncclCommAbort", &source)?,
            all_reduce: sym(&library, "ncclAllReduce", &source)?,
            reduce_scatter: sym(&library, "ncclReduceScatter", &source)?,
            all_gather: sym(&library, "ncclAllGather", &source)?,
            broadcast: sym(&library, "ncclBroadcast", &source)?,
            get_error_string: sym(&library, "ncclGetErrorString", &source)?,
            get_last_error: sym(&library, "ncclGetLastError", &source)?,
            source,
            _library: library,
        }
    };
    // ncclAvg, ncclBfloat16 and non-blocking communicators with ncclCommGetAsyncError polling all
    // exist since 2.14; the config layout is 2.28's (older versions read the prefix they know).
    if api.version < 21400 {
        return Err(format!("{}: NCCL {} is too old (2.14 or newer needed)", api.source, version_string(api.version)));
    }
    Ok(api)
}

impl NcclApi {
    /// A new unique id (rank 0); starts NCCL's bootstrap listener in this process.
    pub(super) fn unique_id(&self) -> Result<[u8; UNIQUE_ID_BYTES], String> {
        let mut id = ncclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
        // SAFETY: `id` is a valid, writable ncclUniqueId.
        let code = unsafe { (self.get_unique_id)(&mut id) };
        if code != NCCL_SUCCESS {
            return Err(format!("ncclGetUniqueId failed: {}", self.describe(code, None)));
        }
        Ok(id.internal.map(|c| c as u8))
    }

    /// `ncclGetErrorString` of `code`, plus `ncclGetLastError` (which can name the peer or call).
    pub(super) fn describe(&self, code: NcclResult, comm: Option<&RawComm>) -> String {
        let name = match code {
            1 => "ncclUnhandledCudaError",
            2 => "ncclSystemError",
            3 => "ncclInternalError",
            4 => "ncclInvalidArgument",
            5 => "ncclInvalidUsage",
            6 => "ncclRemoteError",
            7 => "ncclInProgress",
            8 => "ncclTimeout",
            _ => "nccl error",
        };
        // SAFETY: NCCL returns static strings, or null, for any code.
        let text = unsafe { c_string((self.get_error_string)(code)) };
        let raw = comm.map_or(std::ptr::null_mut(), |c| c.raw);
        // SAFETY: a live communicator or null (the comm argument is unused by current NCCL versions);
        // the string is owned by NCCL and copied at once.
        let last = unsafe { c_string((self.get_last_error)(raw)) };
        match (text.is_empty(), last.is_empty()) {
            (_, false) => format!("{name} ({text}): {last}"),
            (false, true) => format!("{name} ({text})"),
            (true, true) => format!("{name} (code {code})"),
        }
    }
}

/// Copies a C string owned by the library.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that stays valid during the call.
unsafe fn c_string(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated per the function's contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().trim().to_owned()
}

/// One NCCL communicator handle. Dropping it aborts the communicator unless it was destroyed.
pub(super) struct RawComm {
    api: &'static NcclApi,
    raw: ncclComm_t,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls are not concurrent;
// `RawComm` is owned by one `NcclCommunicator`, whose collectives take `&mut self`.
unsafe impl Send for RawComm {}

impl std::fmt::Debug for RawComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawComm({:p})", self.raw)
    }
}

impl RawComm {
    /// `ncclCommInitRankConfig` with `blocking = 0` on the current CUDA device. Returns the handle as
    /// soon as NCCL does (initialisation goes on in the background: poll `async_error`).
    pub(super) fn init(
        api: &'static NcclApi,
        world_size: usize,
        id: &[u8; UNIQUE_ID_BYTES],
        rank: usize,
    ) -> Result<RawComm, String> {
        let nranks = c_int::try_from(world_size).map_err(|_| format!("world size {world_size} is too large"))?;
        let rank_c = c_int::try_from(rank).map_err(|_| format!("rank {rank} is too large"))?;
        let mut config = nonblocking_config();
        let unique = ncclUniqueId { internal: id.map(|b| b as c_char) };
        let mut raw: ncclComm_t = std::ptr::null_mut();
        // SAFETY: `raw` and `config` are valid for writes and outlive the call (NCCL copies the config).
        let code = unsafe { (api.comm_init_rank_config)(&mut raw, nranks, unique, rank_c, &mut config) };
        let comm = RawComm { api, raw };
        if code == NCCL_SUCCESS || code == NCCL_IN_PROGRESS {
            if comm.raw.is_null() {
                return Err("ncclCommInitRankConfig returned no communicator".to_owned());
            }
            Ok(comm)
        } else {
            // Dropping `comm` aborts whatever NCCL allocated.
            Err(format!("ncclCommInitRankConfig failed: {}", api.describe(code, Some(&comm))))
        }
    }

    /// `ncclCommGetAsyncError`: `Ok(NCCL_SUCCESS)` (idle or enqueued), `Ok(NCCL_IN_PROGRESS)`
    /// (initialising, enqueueing, finalising), or the error, described.
    pub(super) fn async_state(&self) -> Result<NcclResult, String> {
        let mut state: NcclResult = NCCL_SUCCESS;
        // SAFETY: `raw` is a live communicator (only `destroy`/`abort`, which consume self, end it).
        let code = unsafe { (self.api.comm_get_async_error)(self.raw, &mut state) };
        if code != NCCL_SUCCESS {
            return Err(format!("ncclCommGetAsyncError failed: {}", self.api.describe(code, Some(self))));
        }
        match state {
            NCCL_SUCCESS | NCCL_IN_PROGRESS => Ok(state),
            error => Err(self.api.describe(error, Some(self))),
        }
    }

    /// Checks the return code of a call on this communicator.
    pub(super) fn check(&self, call: &str, code: NcclResult) -> Result<(), String> {
        match code {
            NCCL_SUCCESS | NCCL_IN_PROGRESS => Ok(()),
            error => Err(format!("{call} failed: {}", self.api.describe(error, Some(self)))),
        }
    }

    /// `ncclCommFinalize`: starts flushing (non-blocking: poll `async_state`).
    pub(super) fn finalize(&self) -> NcclResult {
        // SAFETY: live communicator.
        unsafe { (self.api.comm_finalize)(self.raw) }
    }

    /// `ncclCommDestroy` after a successful finalize.
    pub(super) fn destroy(mut self) -> NcclResult {
        let raw = std::mem::replace(&mut self.raw, std::ptr::null_mut());
        // SAFETY: live communicator, never used again (`self.raw` is now null, so Drop skips it).
        unsafe { (self.api.comm_destroy)(raw) }
    }

    /// `ncclCommAbort`: stops kernels and proxy threads, frees the communicator. Used on every failure.
    pub(super) fn abort(self) {
        drop(self);
    }

    /// In-place all-reduce of `count` elements at `buf`, on the legacy default stream.
    ///
    /// # Safety
    /// `buf` is device memory of the communicator's device holding `count` elements of `dtype`, valid
    /// until the operation completes.
    pub(super) unsafe fn all_reduce(
        &self,
        buf: *mut c_void,
        count: usize,
        dtype: ncclDataType_t,
        op: ncclRedOp_t,
    ) -> NcclResult {
        // SAFETY: per the function's contract; the null stream is the legacy default stream.
        unsafe { (self.api.all_reduce)(buf, buf, count, dtype, op, self.raw, legacy_stream()) }
    }

    /// Reduce-scatter: `send` holds `world * recv_count` elements, `recv` gets `recv_count`.
    ///
    /// # Safety
    /// As for `all_reduce`, for both buffers and their sizes.
    pub(super) unsafe fn reduce_scatter(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        recv_count: usize,
        dtype: ncclDataType_t,
        op: ncclRedOp_t,
    ) -> NcclResult {
        // SAFETY: per the function's contract.
        unsafe { (self.api.reduce_scatter)(send, recv, recv_count, dtype, op, self.raw, legacy_stream()) }
    }

    /// All-gather of `bytes` bytes per rank: `recv` gets `world * bytes` bytes, in rank order.
    ///
    /// # Safety
    /// As for `all_reduce`, for both buffers and their sizes.
    pub(super) unsafe fn all_gather(&self, send: *const c_void, recv: *mut c_void, bytes: usize) -> NcclResult {
        // SAFETY: per the function's contract.
        unsafe { (self.api.all_gather)(send, recv, bytes, ncclDataType_t::ncclUint8, self.raw, legacy_stream()) }
    }

    /// In-place broadcast of `bytes` bytes from `root`.
    ///
    /// # Safety
    /// As for `all_reduce`.
    pub(super) unsafe fn broadcast(&self, buf: *mut c_void, bytes: usize, root: c_int) -> NcclResult {
        // SAFETY: per the function's contract.
        unsafe { (self.api.broadcast)(buf, buf, bytes, ncclDataType_t::ncclUint8, root, self.raw, legacy_stream()) }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        if !self.raw.is_null() {
            // SAFETY: live communicator, never used again. Abort does not wait for peers.
            let _ = unsafe { (self.api.comm_abort)(self.raw) };
            self.raw = std::ptr::null_mut();
        }
    }
}

/// `NCCL_CONFIG_INITIALIZER` (2.28) with `blocking = 0`.
fn nonblocking_config() -> ncclConfig_t {
    ncclConfig_t {
        size: std::mem::size_of::<ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: CONFIG_UNDEF_INT,
        minCTAs: CONFIG_UNDEF_INT,
        maxCTAs: CONFIG_UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: CONFIG_UNDEF_INT,
        trafficClass: CONFIG_UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: CONFIG_UNDEF_INT,
        CTAPolicy: CONFIG_UNDEF_INT,
        shrinkShare: CONFIG_UNDEF_INT,
        nvlsCTAs: CONFIG_UNDEF_INT,
        nChannelsPerNetPeer: CONFIG_UNDEF_INT,
        nvlinkCentricSched: CONFIG_UNDEF_INT,
    }
}

/// The legacy default stream (handle 0): libtorch's default stream, which the worker never changes,
/// so NCCL kernels run after the libtorch kernels queued before them and before those queued after.
fn legacy_stream() -> StreamT {
    std::ptr::null_mut()
}

/// What the CUDA libraries look like here: checked once, without panicking.
pub(super) fn cuda_libraries() -> Result<(), String> {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    CHECK.get_or_init(check_cuda_libraries).clone()
}

fn check_cuda_libraries() -> Result<(), String> {
    let loader = "through the dynamic loader (LD_LIBRARY_PATH, the binary's run path, libraries already \
                  loaded by libtorch, /etc/ld.so.cache, /lib, /usr/lib)";
    // SAFETY: dlopens the CUDA runtime under cudarc's candidate names and closes it again; loading the
    // CUDA runtime has no side effects beyond its initialisers.
    if !unsafe { cudart::is_culib_present() } {
        return Err(format!(
            "the CUDA runtime library was not found: looked for {} {loader}; PyPI torch's CUDA build ships \
             libcudart.so.13 in site-packages/nvidia/cu13/lib and libtorch_cuda.so loads it, so this libtorch \
             is probably a CPU-only build",
            names(&cudarc::get_lib_name_candidates("cudart"))
        ));
    }
    // SAFETY: as above, for the driver library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(format!(
            "the NVIDIA driver library (libcuda.so.1) was not found: looked for {} {loader}; it comes with the \
             NVIDIA driver, so this machine has no usable GPU",
            names(&cudarc::get_lib_name_candidates("cuda"))
        ));
    }
    Ok(())
}

fn names(candidates: &[String]) -> String {
    let mut unique: Vec<&str> = Vec::new();
    for c in candidates {
        if !unique.contains(&c.as_str()) {
            unique.push(c);
        }
    }
    unique.join(", ")
}

fn cuda_error(call: &str, e: cudarc::runtime::result::RuntimeError) -> String {
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{call} failed: {:?} ({text})", e.0)
}

/// Number of CUDA devices (after `cuda_libraries`).
pub(super) fn device_count() -> Result<usize, String> {
    let count = cudarc::runtime::result::device::get_count().map_err(|e| cuda_error("cudaGetDeviceCount", e))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// `cudaSetDevice` (after `cuda_libraries`).
pub(super) fn set_device(index: usize) -> Result<(), String> {
    let ordinal = i32::try_from(index).map_err(|_| format!("device index {index} is too large"))?;
    cudarc::runtime::result::device::set(ordinal).map_err(|e| cuda_error("cudaSetDevice", e))
}

/// A CUDA event (timing disabled) of the device current at creation.
pub(super) struct Event {
    raw: cudart::cudaEvent_t,
}

// SAFETY: CUDA events may be recorded, queried and destroyed from any host thread.
unsafe impl Send for Event {}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Event({:p})", self.raw)
    }
}

impl Event {
    pub(super) fn new() -> Result<Event, String> {
        let raw = cudarc::runtime::result::event::create(cudart::cudaEventDisableTiming)
            .map_err(|e| cuda_error("cudaEventCreateWithFlags", e))?;
        Ok(Event { raw })
    }

    /// Records the event on the legacy default stream.
    pub(super) fn record(&self) -> Result<(), String> {
        // SAFETY: a live event of the current device; the null stream is the legacy default stream.
        unsafe { cudarc::runtime::result::event::record(self.raw, std::ptr::null_mut()) }
            .map_err(|e| cuda_error("cudaEventRecord", e))
    }

    /// Whether the work recorded before the event has finished (never blocks).
    pub(super) fn is_done(&self) -> Result<bool, String> {
        // SAFETY: a live event.
        match unsafe { cudart::cudaEventQuery(self.raw) } {
            cudart::cudaError_t::cudaSuccess => Ok(true),
            cudart::cudaError_t::cudaErrorNotReady => Ok(false),
            e => Err(cuda_error("cudaEventQuery", cudarc::runtime::result::RuntimeError(e))),
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: a live event, destroyed once; CUDA releases it when pending work completes.
        let _ = unsafe { cudarc::runtime::result::event::destroy(self.raw) };
    }
}

/// Where the NCCL library came from, for reports.
pub(super) fn nccl_source() -> Option<(String, i32)> {
    nccl_api().ok().map(|api| (api.source.clone(), api.version))
}
