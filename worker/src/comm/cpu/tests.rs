use std::time::Duration;

use tch::{Device, Kind, Tensor};

use super::*;
use crate::comm::testing::{TEST_TIMEOUT, run_ranks};

/// Runs `f` on a `CpuCommunicator` per rank (generation 1); results in rank order.
fn with_comms<R: Send>(world: usize, timeout: Duration, f: impl Fn(CpuCommunicator) -> R + Sync) -> Vec<R> {
    run_ranks(world, |rank, listener, peers| {
        let comm = connect_cpu(listener, rank, peers, 1, timeout)
            .unwrap_or_else(|e| panic!("rank {rank} failed to connect: {e}"));
        f(comm)
    })
}

/// Small integers per rank: sums are exact whatever the order.
fn rank_tensor(rank: usize, shape: &[i64], kind: Kind) -> Tensor {
    let numel: i64 = shape.iter().product();
    (Tensor::arange(numel, (Kind::Int64, Device::Cpu)) * 7 + rank as i64 * 5).remainder(11).to_kind(kind).reshape(shape)
}

#[test]
fn all_reduce_sum_of_tensors_matches_the_reference() {
    let shapes: [&[i64]; 5] = [&[], &[0], &[1], &[3, 4], &[2, 3, 5]];
    for world in 1..=5 {
        with_comms(world, TEST_TIMEOUT, |mut comm| {
            assert_eq!((comm.world_size(), comm.generation()), (world, 1));
            let rank = comm.rank();
            for kind in [Kind::Float, Kind::Double] {
                for shape in shapes {
                    let expected = (0..world)
                        .map(|r| rank_tensor(r, shape, kind))
                        .fold(Tensor::zeros(shape, (kind, Device::Cpu)), |acc, t| acc + t);
                    let mut t = rank_tensor(rank, shape, kind);
                    comm.all_reduce_sum(&mut t).expect("all_reduce");
                    assert_eq!(t.size(), shape);
                    assert!(t.equal(&expected), "world {world}, rank {rank}, {kind:?} {shape:?}");
                }
                // Non-contiguous input: summed in logical order, written back in place.
                let mut t = rank_tensor(rank, &[4, 3], kind).tr();
                let expected = (0..world)
                    .map(|r| rank_tensor(r, &[4, 3], kind).tr())
                    .fold(Tensor::zeros([3, 4], (kind, Device::Cpu)), |acc, t| acc + t);
                comm.all_reduce_sum(&mut t).expect("all_reduce_sum of a transposed tensor");
                assert!(t.equal(&expected), "world {world}, rank {rank}, transposed {kind:?}");
            }
        });
    }
}

#[test]
fn all_reduce_sum_works_on_a_leaf_that_requires_grad() {
    with_comms(2, TEST_TIMEOUT, |mut comm| {
        let mut t = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        comm.all_reduce_sum(&mut t).expect("all_reduce");
        assert!(t.equal(&Tensor::full([3], 2.0, (Kind::Float, Device::Cpu))));
        assert!(t.requires_grad());
    });
}

#[test]
fn all_reduce_sum_refuses_other_kinds_without_touching_the_ring() {
    with_comms(2, TEST_TIMEOUT, |mut comm| {
        let mut t = Tensor::from_slice(&[1i64, 2]);
        let err = comm.all_reduce_sum(&mut t).expect_err("int64 is not summed");
        assert!(matches!(err, CommError::Unsupported { .. }), "{err}");
        assert!(err.to_string().starts_with("all_reduce: unsupported"), "{err}");
        comm.barrier().expect("the ring is still usable");
    });
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
fn a_silent_rank_makes_tensor_collectives_fail_with_a_peer_error() {
    let results = with_comms(3, Duration::from_secs(1), |mut comm| {
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
        assert!(elapsed < Duration::from_secs(5), "rank {rank}: {elapsed:?}");
        assert!(err.to_string().contains("all_reduce: peer rank"), "rank {rank}: {err}");
    }
}
