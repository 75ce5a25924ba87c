//! [`self_check`]: the NCCL backend on one GPU, behind `hcmoco-worker nccl-check`.
//!
//! NCCL refuses two ranks on one device, so this runs at world size 1: every collective is checked
//! against the values it must leave (the identity, at one rank), error paths are checked to leave the
//! communicator usable, the abort handle and the set-up timeout (a world of 2 whose second rank never
//! comes) are exercised, and one 64 MiB all-reduce is timed with and without device synchronisation
//! around it. Multi-rank failure (a peer dying mid-collective) cannot be exercised on one GPU.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tch::{Device, Kind, Tensor};

use super::{CommError, Communicator, ReduceOp, connect_nccl, ffi, nccl_available, nccl_unique_id};

const TIMEOUT: Duration = Duration::from_secs(30);
/// The set-up timeout exercised with a missing peer.
const MISSING_PEER_TIMEOUT: Duration = Duration::from_secs(3);
const TIMED_BYTES: i64 = 64 << 20;
const TIMED_ITERATIONS: u32 = 20;

/// Lines of the report; each is also logged as it happens, so a hang still shows how far it got.
#[derive(Default)]
struct Report {
    text: String,
    failures: usize,
}

impl Report {
    fn info(&mut self, line: String) {
        tracing::info!(check = %line, "nccl self-check");
        let _ = writeln!(self.text, "{line}");
    }

    /// Records one step: `Ok(())` passes, `Err` says what was wrong.
    fn step(&mut self, name: &str, outcome: anyhow::Result<()>) {
        match outcome {
            Ok(()) => self.info(format!("ok    {name}")),
            Err(e) => {
                self.failures += 1;
                self.info(format!("FAIL  {name}: {e:#}"));
            }
        }
    }
}

fn same(got: &Tensor, expected: &Tensor) -> anyhow::Result<()> {
    anyhow::ensure!(got.size() == expected.size(), "shape {:?}, expected {:?}", got.size(), expected.size());
    anyhow::ensure!(got.kind() == expected.kind(), "kind {:?}, expected {:?}", got.kind(), expected.kind());
    anyhow::ensure!(got.equal(expected), "values differ: got {got}, expected {expected}");
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Mean wall time of `f` over `n` runs, after two warm-up runs.
fn mean_time(n: u32, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    f()?;
    f()?;
    let start = Instant::now();
    for _ in 0..n {
        f()?;
    }
    Ok(start.elapsed() / n)
}

/// Runs the checks on CUDA device `device_index` and returns a human-readable report; `Err` (carrying
/// the report) when NCCL is unusable or a check failed.
pub fn self_check(device_index: usize) -> anyhow::Result<String> {
    let mut report = Report::default();
    nccl_available().map_err(anyhow::Error::msg)?;
    if let Some((source, version)) = ffi::nccl_source() {
        report.info(format!("nccl {} loaded from {source}", ffi::version_string(version)));
    }
    report.info(format!("cuda devices visible: {}, using cuda:{device_index}", tch::Cuda::device_count()));
    let id = nccl_unique_id().context("nccl_unique_id")?;
    let start = Instant::now();
    let mut comm = connect_nccl(0, 1, 0, &id, device_index, TIMEOUT).context("connect_nccl (world size 1)")?;
    report.info(format!("connect (world size 1, non-blocking init): {:.1} ms", ms(start.elapsed())));
    let device = Device::Cuda(device_index);
    let values = |kind: Kind| (Tensor::arange(12, (Kind::Float, device)).reshape([3, 4]) - 5.0).to_kind(kind);

    for kind in [Kind::Float, Kind::BFloat16, Kind::Double] {
        for op in [ReduceOp::Sum, ReduceOp::Average] {
            report.step(
                &format!("all_reduce {op:?} {kind:?} [3, 4]"),
                (|| {
                    let mut t = values(kind);
                    comm.all_reduce(&mut t, op)?;
                    same(&t, &values(kind))
                })(),
            );
        }
    }
    report.step(
        "all_reduce Sum Float on a transposed (non-contiguous) view",
        (|| {
            let mut t = values(Kind::Float).tr();
            comm.all_reduce(&mut t, ReduceOp::Sum)?;
            same(&t, &values(Kind::Float).tr())
        })(),
    );
    report.step(
        "reduce_scatter Average Float, 7 elements",
        (|| {
            let t = Tensor::arange(7, (Kind::Float, device));
            same(&comm.reduce_scatter(&t, ReduceOp::Average)?, &t)
        })(),
    );
    for (kind, rows) in [(Kind::Float, 3), (Kind::Float, 0), (Kind::Int64, 3), (Kind::Bool, 2)] {
        report.step(
            &format!("all_gather_cat {kind:?} [{rows}, 4]"),
            (|| {
                let t = Tensor::arange(rows * 4, (Kind::Int64, device)).remainder(3).reshape([rows, 4]).to_kind(kind);
                same(&comm.all_gather_cat(&t)?, &t)
            })(),
        );
    }
    for kind in [Kind::Float, Kind::BFloat16] {
        report.step(
            &format!("broadcast {kind:?} [3, 4] from root 0"),
            (|| {
                let mut t = values(kind);
                comm.broadcast(&mut t, 0)?;
                same(&t, &values(kind))
            })(),
        );
    }
    report.step("barrier", comm.barrier().map_err(Into::into));

    report.step(
        "a cpu tensor is Unsupported",
        (|| {
            let mut t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
            match comm.all_reduce(&mut t, ReduceOp::Sum) {
                Err(CommError::Unsupported { .. }) => Ok(()),
                other => anyhow::bail!("got {other:?}"),
            }
        })(),
    );
    report.step(
        "an Int64 all_reduce is Unsupported",
        (|| {
            let mut t = Tensor::zeros([2], (Kind::Int64, device));
            match comm.all_reduce(&mut t, ReduceOp::Sum) {
                Err(CommError::Unsupported { .. }) => Ok(()),
                other => anyhow::bail!("got {other:?}"),
            }
        })(),
    );
    report.step(
        "broadcast from root 1 of 1 is InvalidArgument",
        (|| {
            let mut t = values(Kind::Float);
            match comm.broadcast(&mut t, 1) {
                Err(CommError::InvalidArgument { .. }) => Ok(()),
                other => anyhow::bail!("got {other:?}"),
            }
        })(),
    );
    report.step("the communicator is still usable after those errors", comm.barrier().map_err(Into::into));

    // Timings: the all-reduce as the backend runs it (stream-ordered, host polls for completion),
    // and with a device synchronisation before and after (the alternative way of ordering).
    let timed = (|| -> anyhow::Result<()> {
        let mut big = Tensor::ones([TIMED_BYTES / 4], (Kind::Float, device));
        let index = device_index as i64;
        let plain = mean_time(TIMED_ITERATIONS, || Ok(comm.all_reduce(&mut big, ReduceOp::Sum)?))?;
        let synced = mean_time(TIMED_ITERATIONS, || {
            tch::Cuda::synchronize(index);
            comm.all_reduce(&mut big, ReduceOp::Sum)?;
            tch::Cuda::synchronize(index);
            Ok(())
        })?;
        let sync_alone = mean_time(TIMED_ITERATIONS, || {
            tch::Cuda::synchronize(index);
            Ok(())
        })?;
        let barrier = mean_time(TIMED_ITERATIONS, || Ok(comm.barrier()?))?;
        let mut small = Tensor::ones([1024], (Kind::Float, device));
        let small_reduce = mean_time(TIMED_ITERATIONS, || Ok(comm.all_reduce(&mut small, ReduceOp::Sum)?))?;
        report.info(format!(
            "timing (world size 1: NCCL copies at most, so these are call, agreement and ordering costs, not bandwidth; \
             mean of {TIMED_ITERATIONS})"
        ));
        report.info(format!("  all_reduce 64 MiB f32, stream-ordered:             {:.3} ms", ms(plain)));
        report.info(format!("  all_reduce 64 MiB f32, device sync before+after:   {:.3} ms", ms(synced)));
        report.info(format!("  tch::Cuda::synchronize on an idle device:          {:.3} ms", ms(sync_alone)));
        report.info(format!("  barrier (= the header exchange before each call):  {:.3} ms", ms(barrier)));
        report.info(format!("  all_reduce 4 KiB f32:                              {:.3} ms", ms(small_reduce)));
        Ok(())
    })();
    report.step("timing runs", timed);

    report.step(
        "abort handle: later calls return Aborted with the reason",
        (|| {
            comm.abort_handle().abort("self-check abort");
            match comm.barrier() {
                Err(CommError::Aborted { reason, .. }) if reason == "self-check abort" => {}
                other => anyhow::bail!("barrier after abort: got {other:?}"),
            }
            match comm.all_gather_cat(&values(Kind::Float)) {
                Err(CommError::Aborted { .. }) => Ok(()),
                other => anyhow::bail!("all_gather_cat after abort: got {other:?}"),
            }
        })(),
    );
    drop(comm);

    // Last, as it is the one most likely to hang if NCCL's abort does not interrupt its bootstrap.
    let missing_peer = (|| -> anyhow::Result<String> {
        let id = nccl_unique_id()?;
        let start = Instant::now();
        let outcome = connect_nccl(0, 2, 1, &id, device_index, MISSING_PEER_TIMEOUT);
        let took = start.elapsed();
        match outcome {
            Err(CommError::Aborted { reason, .. }) => {
                anyhow::ensure!(took < MISSING_PEER_TIMEOUT + Duration::from_secs(10), "took {took:?}: {reason}");
                Ok(format!("  missing peer: error after {:.0} ms: {reason}", ms(took)))
            }
            Err(other) => anyhow::bail!("unexpected error after {took:?}: {other}"),
            Ok(_) => anyhow::bail!("a world of 2 formed with one rank"),
        }
    })();
    let name = format!("set-up with a missing peer fails within {MISSING_PEER_TIMEOUT:?} plus abort time");
    match missing_peer {
        Ok(line) => {
            report.step(&name, Ok(()));
            report.info(line);
        }
        Err(e) => report.step(&name, Err(e)),
    }

    if report.failures > 0 {
        anyhow::bail!("{} nccl self-check step(s) failed\n{}", report.failures, report.text);
    }
    Ok(report.text)
}
