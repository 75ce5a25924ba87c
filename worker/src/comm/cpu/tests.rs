use std::time::Duration;

use half::bf16;
use tch::{Device, Kind, Tensor};

use super::*;
use crate::comm::chunk_range;
use crate::comm::testing::{TEST_TIMEOUT, TRANSPORTS, one_host, options, run_ranks};

/// Runs `f` on a `CpuCommunicator` per rank (generation 1, all ranks on one host, tcp); results in rank order.
fn with_comms<R: Send>(world: usize, timeout: Duration, f: impl Fn(CpuCommunicator) -> R + Sync) -> Vec<R> {
    run_ranks(world, |rank, listener, peers| {
        let comm = connect_cpu(listener, rank, peers, 1, timeout)
            .unwrap_or_else(|e| panic!("rank {rank} failed to connect: {e}"));
        f(comm)
    })
}

/// As `with_comms`, over `transport`.
fn with_comms_over<R: Send>(
    world: usize,
    transport: Transport,
    timeout: Duration,
    f: impl Fn(CpuCommunicator) -> R + Sync,
) -> Vec<R> {
    run_ranks(world, |rank, listener, peers| {
        let comm = connect_cpu_with(listener, rank, &one_host(peers), 1, &options(transport, timeout))
            .unwrap_or_else(|e| panic!("rank {rank} failed to connect over {transport:?}: {e}"));
        f(comm)
    })
}

/// Small integers per rank: sums are exact whatever the order, in every kind (bf16 holds integers up
/// to 256 exactly).
fn rank_values(rank: usize, numel: usize) -> Vec<f64> {
    (0..numel).map(|i| ((i * 7 + rank * 5) % 11) as f64).collect()
}

fn tensor_of(values: &[f64], shape: &[i64], kind: Kind) -> Tensor {
    Tensor::from_slice(values).to_kind(kind).reshape(shape)
}

fn rank_tensor(rank: usize, shape: &[i64], kind: Kind) -> Tensor {
    let numel = shape.iter().product::<i64>() as usize;
    tensor_of(&rank_values(rank, numel), shape, kind)
}

/// The exact sum over ranks, and the average as the ring computes it: the exact sum divided once, in
/// the element type (in f32 for bf16, rounded once).
fn expected(world: usize, shape: &[i64], kind: Kind, op: ReduceOp) -> Tensor {
    let numel = shape.iter().product::<i64>() as usize;
    let per_rank: Vec<Vec<f64>> = (0..world).map(|r| rank_values(r, numel)).collect();
    let sums: Vec<f64> = (0..numel).map(|i| per_rank.iter().map(|v| v[i]).sum()).collect();
    let w = world as f64;
    match (op, kind) {
        (ReduceOp::Sum, _) => tensor_of(&sums, shape, kind),
        (ReduceOp::Average, Kind::Float) => {
            let v: Vec<f32> = sums.iter().map(|&s| s as f32 / w as f32).collect();
            Tensor::from_slice(&v).reshape(shape)
        }
        (ReduceOp::Average, Kind::BFloat16) => {
            // (tch maps `half::bf16` to Kind::Half, so the tensor is built from bytes.)
            let v: Vec<bf16> = sums.iter().map(|&s| bf16::from_f32(s as f32 / w as f32)).collect();
            Tensor::from_data_size(bytemuck::cast_slice(&v), shape, Kind::BFloat16)
        }
        (ReduceOp::Average, _) => {
            let v: Vec<f64> = sums.iter().map(|&s| s / w).collect();
            Tensor::from_slice(&v).reshape(shape)
        }
    }
}

const KINDS: [Kind; 3] = [Kind::Float, Kind::Double, Kind::BFloat16];
const OPS: [ReduceOp; 2] = [ReduceOp::Sum, ReduceOp::Average];

#[test]
fn all_reduce_and_reduce_scatter_of_tensors_match_the_reference() {
    let shapes: [&[i64]; 6] = [&[], &[0], &[1], &[3, 4], &[2, 3, 5], &[1001, 7]];
    for transport in TRANSPORTS {
        for world in 1..=5 {
            with_comms_over(world, transport, TEST_TIMEOUT, |mut comm| {
                assert_eq!((comm.world_size(), comm.generation()), (world, 1));
                let rank = comm.rank();
                for kind in KINDS {
                    for op in OPS {
                        let what = format!("{transport:?}, world {world}, rank {rank}, {kind:?}, {op:?}");
                        for shape in shapes {
                            let want = expected(world, shape, kind, op);
                            let mut t = rank_tensor(rank, shape, kind);
                            comm.all_reduce(&mut t, op).unwrap_or_else(|e| panic!("{what} {shape:?}: {e}"));
                            assert_eq!(t.size(), shape);
                            assert!(t.equal(&want), "{what} {shape:?}: all_reduce");

                            let chunk =
                                comm.reduce_scatter(&rank_tensor(rank, shape, kind), op).expect("reduce_scatter");
                            let flat = want.reshape([-1]);
                            let r = chunk_range(flat.numel(), world, rank);
                            assert_eq!(chunk.size(), [r.len() as i64], "{what} {shape:?}");
                            assert_eq!(chunk.kind(), kind);
                            assert!(
                                chunk.equal(&flat.narrow(0, r.start as i64, r.len() as i64)),
                                "{what} {shape:?}: reduce_scatter"
                            );
                        }
                        // Non-contiguous input: reduced in logical order, written back in place.
                        let mut t = rank_tensor(rank, &[4, 3], kind).tr();
                        comm.all_reduce(&mut t, op).expect("all_reduce of a transposed tensor");
                        assert!(t.equal(&expected(world, &[4, 3], kind, op).tr()), "{what}: transposed");
                        let chunk =
                            comm.reduce_scatter(&rank_tensor(rank, &[4, 3], kind).tr(), op).expect("reduce_scatter");
                        let flat = expected(world, &[4, 3], kind, op).tr().contiguous().reshape([-1]);
                        let r = chunk_range(12, world, rank);
                        assert!(chunk.equal(&flat.narrow(0, r.start as i64, r.len() as i64)), "{what}: transposed");
                    }
                }
            });
        }
    }
}

#[test]
fn all_reduce_works_on_a_leaf_that_requires_grad_and_on_a_view() {
    with_comms(2, TEST_TIMEOUT, |mut comm| {
        let mut t = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        comm.all_reduce_sum(&mut t).expect("all_reduce");
        assert!(t.equal(&Tensor::full([3], 2.0, (Kind::Float, Device::Cpu))));
        assert!(t.requires_grad());
        // A contiguous slice of a bigger tensor is reduced in place, leaving the rest alone.
        let whole = Tensor::ones([10], (Kind::Double, Device::Cpu));
        let mut middle = whole.narrow(0, 3, 4);
        comm.all_reduce(&mut middle, ReduceOp::Average).expect("all_reduce of a view");
        comm.all_reduce_sum(&mut middle).expect("all_reduce of a view");
        let want: Vec<f64> = (0..10).map(|i| if (3..7).contains(&i) { 2.0 } else { 1.0 }).collect();
        assert!(whole.equal(&Tensor::from_slice(&want)));
    });
}

#[test]
fn reductions_refuse_other_kinds_without_touching_the_ring() {
    with_comms(2, TEST_TIMEOUT, |mut comm| {
        let mut t = Tensor::from_slice(&[1i64, 2]);
        let err = comm.all_reduce_sum(&mut t).expect_err("int64 is not summed");
        assert!(matches!(err, CommError::Unsupported { .. }), "{err}");
        assert!(err.to_string().starts_with("all_reduce: unsupported"), "{err}");
        let err = comm.reduce_scatter(&Tensor::from_slice(&[1u8, 2]), ReduceOp::Sum).expect_err("uint8");
        assert!(err.to_string().starts_with("reduce_scatter: unsupported"), "{err}");
        comm.barrier().expect("the ring is still usable");
    });
}

#[test]
fn an_aborted_communicator_fails_every_later_call() {
    for transport in TRANSPORTS {
        let results = with_comms_over(2, transport, TEST_TIMEOUT, |mut comm| {
            let handle = comm.abort_handle();
            handle.abort("new generation");
            handle.abort("ignored: the first reason stays");
            let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
            let first = comm.all_reduce_sum(&mut t).expect_err("aborted");
            let later = comm.barrier().expect_err("poisoned");
            (first, later)
        });
        for (first, later) in results {
            assert!(matches!(first, CommError::Aborted { .. }), "{first}");
            assert_eq!(first.to_string(), "all_reduce: aborted: new generation");
            assert!(matches!(later, CommError::Poisoned { .. }), "{later}");
        }
    }
}

#[test]
fn all_gather_cat_concatenates_unequal_rows_in_rank_order() {
    for world in 1..=5 {
        let rows = |rank: usize| ((rank * 2 + 1) % 3) as i64; // 1, 0, 2, 1, 0
        with_comms(world, TEST_TIMEOUT, |mut comm| {
            let rank = comm.rank();
            for kind in [Kind::Float, Kind::Double, Kind::Int64] {
                let local = rank_tensor(rank, &[rows(rank), 3, 2], kind);
                let gathered = comm.all_gather_cat(&local).expect("all_gather_cat");
                let parts: Vec<Tensor> = (0..world).map(|r| rank_tensor(r, &[rows(r), 3, 2], kind)).collect();
                let expected = Tensor::cat(&parts, 0);
                assert_eq!(gathered.size(), expected.size(), "world {world}, rank {rank}, {kind:?}");
                assert_eq!(gathered.kind(), kind);
                assert!(gathered.equal(&expected), "world {world}, rank {rank}, {kind:?}");
            }
        });
    }
}

#[test]
fn all_gather_cat_reports_the_rank_whose_shape_differs() {
    let results = with_comms(3, TEST_TIMEOUT, |mut comm| {
        let cols = if comm.rank() == 2 { 4 } else { 3 };
        let err =
            comm.all_gather_cat(&Tensor::zeros([2, cols], (Kind::Float, Device::Cpu))).expect_err("shapes differ");
        // Detected after the exchange: the ring stays usable.
        comm.barrier().expect("barrier after a mismatch");
        err
    });
    for (rank, err) in results.into_iter().enumerate() {
        assert!(matches!(err, CommError::Mismatch { rank: 2, .. }), "rank {rank}: {err}");
        assert!(err.to_string().contains("[2, 4] Float"), "rank {rank}: {err}");
    }
}

#[test]
fn all_gather_cat_reports_a_kind_mismatch() {
    let results = with_comms(2, TEST_TIMEOUT, |mut comm| {
        let kind = if comm.rank() == 1 { Kind::Double } else { Kind::Float };
        comm.all_gather_cat(&Tensor::zeros([1, 2], (kind, Device::Cpu)))
    });
    for result in results {
        let err = result.expect_err("kinds differ");
        assert!(matches!(err, CommError::Mismatch { rank: 1, .. }), "{err}");
    }
}

#[test]
fn broadcast_from_a_non_zero_root() {
    with_comms(3, TEST_TIMEOUT, |mut comm| {
        let root = 2;
        let value = Tensor::arange(20, (Kind::Double, Device::Cpu)).view([4, 5]) * 0.5;
        let mut t = if comm.rank() == root { value.copy() } else { Tensor::zeros([4, 5], (Kind::Double, Device::Cpu)) };
        comm.broadcast(&mut t, root).expect("broadcast");
        assert!(t.equal(&value), "rank {}", comm.rank());
    });
}

#[test]
fn broadcast_into_a_tensor_of_another_shape_is_a_mismatch() {
    let results = with_comms(3, TEST_TIMEOUT, |mut comm| {
        let rows = if comm.rank() == 1 { 3 } else { 2 };
        let mut t = Tensor::ones([rows, 2], (Kind::Float, Device::Cpu));
        comm.broadcast(&mut t, 0)
    });
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    let err = results[1].as_ref().expect_err("rank 1 differs");
    assert!(matches!(err, CommError::Mismatch { rank: 1, .. }), "{err}");
}

#[test]
fn barrier_and_ids() {
    let ids = with_comms(4, TEST_TIMEOUT, |mut comm| {
        comm.barrier().expect("barrier");
        (comm.rank(), comm.world_size())
    });
    assert_eq!(ids, [(0, 4), (1, 4), (2, 4), (3, 4)]);
}

#[test]
fn a_rank_that_leaves_makes_tensor_collectives_fail_naming_a_peer() {
    for transport in TRANSPORTS {
        let results = with_comms_over(3, transport, Duration::from_secs(10), |mut comm| {
            if comm.rank() == 1 {
                return None;
            }
            let start = std::time::Instant::now();
            let mut t = Tensor::ones([8], (Kind::Float, Device::Cpu));
            Some((comm.all_reduce_sum(&mut t), start.elapsed()))
        });
        for (rank, outcome) in results.into_iter().enumerate() {
            let Some((result, elapsed)) = outcome else {
                continue;
            };
            let err = result.expect_err("rank 1 left");
            assert!(elapsed < Duration::from_secs(3), "{transport:?} rank {rank}: {elapsed:?}");
            assert_eq!(err.peer_rank(), Some(1), "{transport:?} rank {rank}: {err}");
            assert!(err.to_string().contains("peer rank 1"), "{transport:?} rank {rank}: {err}");
        }
    }
}
