use std::fmt::Debug;
use std::io::{Read, Write};
use std::sync::Barrier;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;

use super::*;
use crate::comm::ring::{PIECE_BYTES, chunk_range, split_pair};
use crate::comm::testing::{TEST_TIMEOUT, bind_listeners, pseudo_random, run_listeners, run_ranks, with_rings};

/// Buffer lengths worth testing for a world size: empty, shorter than W, not divisible by W, more
/// than one read piece.
fn lengths(world: usize) -> Vec<usize> {
    let mut v = vec![0, 1, 2, 3, world - 1, world + 1, 2 * world + 1, 1000, 4099, 65_537, 100_003];
    v.sort_unstable();
    v.dedup();
    v
}

/// Small integers: sums are exact in f32, so every ring order gives the reference bit for bit.
fn small_int(rank: usize, i: usize) -> f32 {
    ((rank * 31 + i * 7) % 13) as f32 - 6.0
}

fn check_all_reduce_exact<T: Element + From<f32> + PartialEq + Debug>(ring: &mut TcpRing, len: usize) {
    let (rank, world) = (ring.rank(), ring.world_size());
    let mut buf: Vec<T> = (0..len).map(|i| T::from(small_int(rank, i))).collect();
    ring.all_reduce_sum(&mut buf).unwrap_or_else(|e| panic!("rank {rank}, {} len {len}: {e}", T::DTYPE));
    let expected: Vec<T> = (0..len).map(|i| T::from((0..world).map(|r| small_int(r, i)).sum::<f32>())).collect();
    assert!(buf == expected, "rank {rank}, world {world}, {} len {len}: wrong sum", T::DTYPE);
}

#[test]
fn all_reduce_matches_reference_for_world_sizes_1_to_5() {
    for world in 1..=5 {
        with_rings(world, TEST_TIMEOUT, |mut ring| {
            for len in lengths(world) {
                check_all_reduce_exact::<f32>(&mut ring, len);
                check_all_reduce_exact::<f64>(&mut ring, len);
            }
        });
    }
}

#[test]
fn all_reduce_of_a_million_random_values_is_bit_identical_across_ranks() {
    const LEN: usize = (1 << 20) + 3;
    let inputs: Vec<Vec<f64>> = (0..5).map(|r| pseudo_random(r as u64 + 1, LEN)).collect();
    for world in 1..=5 {
        let results = with_rings(world, TEST_TIMEOUT, |mut ring| {
            let input = &inputs[ring.rank()];
            let mut single: Vec<f32> = input.iter().map(|&x| x as f32).collect();
            let mut double = input.clone();
            ring.all_reduce_sum(&mut single).expect("f32 all_reduce");
            ring.all_reduce_sum(&mut double).expect("f64 all_reduce");
            (single, double)
        });
        let (single0, double0) = &results[0];
        for (rank, (single, double)) in results.iter().enumerate().skip(1) {
            assert!(
                bytemuck::cast_slice::<f32, u32>(single) == bytemuck::cast_slice::<f32, u32>(single0),
                "world {world}: rank {rank} f32 differs from rank 0"
            );
            assert!(
                bytemuck::cast_slice::<f64, u64>(double) == bytemuck::cast_slice::<f64, u64>(double0),
                "world {world}: rank {rank} f64 differs from rank 0"
            );
        }
        for i in 0..LEN {
            let reference: f64 = inputs[..world].iter().map(|v| v[i]).sum();
            let reference32: f64 = inputs[..world].iter().map(|v| f64::from(v[i] as f32)).sum();
            assert!((double0[i] - reference).abs() <= 1e-12, "world {world}, f64 element {i}");
            assert!((f64::from(single0[i]) - reference32).abs() <= 1e-5, "world {world}, f32 element {i}");
        }
    }
}

fn block(rank: usize, round: usize) -> Vec<u8> {
    let len = match (rank + round) % 4 {
        0 => 0,
        1 => 1,
        2 => 37,
        _ => 3 * PIECE_BYTES + 11,
    };
    (0..len).map(|i| (i * 13 + rank * 7 + round) as u8).collect()
}

#[test]
fn all_gather_bytes_returns_every_ranks_block_in_rank_order() {
    for world in 1..=5 {
        let results = with_rings(world, TEST_TIMEOUT, |mut ring| {
            (0..4)
                .map(|round| ring.all_gather_bytes(&block(ring.rank(), round)).expect("all_gather_bytes"))
                .collect::<Vec<_>>()
        });
        for (rank, rounds) in results.iter().enumerate() {
            for (round, gathered) in rounds.iter().enumerate() {
                let expected: Vec<Vec<u8>> = (0..world).map(|r| block(r, round)).collect();
                assert!(gathered == &expected, "world {world}, rank {rank}, round {round}");
            }
        }
    }
}

#[test]
fn broadcast_bytes_from_every_root() {
    for world in 1..=5 {
        with_rings(world, TEST_TIMEOUT, |mut ring| {
            for root in 0..world {
                for len in [0, 1, 1000, 3 * PIECE_BYTES + 5] {
                    let expected: Vec<u8> = (0..len).map(|i| (i * 3 + root * 11 + len) as u8).collect();
                    let mut buf = if ring.rank() == root { expected.clone() } else { vec![0xAB; 17] };
                    ring.broadcast_bytes(&mut buf, root).expect("broadcast_bytes");
                    assert!(buf == expected, "world {world}, rank {}, root {root}, len {len}", ring.rank());
                }
            }
        });
    }
}

#[test]
fn barrier_returns_only_after_every_rank_arrived() {
    const ROUNDS: usize = 5;
    for world in 1..=5 {
        let arrived = AtomicUsize::new(0);
        with_rings(world, TEST_TIMEOUT, |mut ring| {
            for round in 1..=ROUNDS {
                arrived.fetch_add(1, Ordering::SeqCst);
                ring.barrier().expect("barrier");
                assert!(arrived.load(Ordering::SeqCst) >= world * round, "world {world}, round {round}");
            }
        });
    }
}

#[test]
fn world_of_one_needs_no_peer() {
    let (mut listeners, peers) = bind_listeners(1);
    let listener = listeners.pop().expect("one listener");
    let mut ring = TcpRing::connect(listener, 0, &peers, 3, Duration::from_millis(100)).expect("connect");
    let mut values = vec![1.5f32, -2.0];
    ring.all_reduce_sum(&mut values).expect("all_reduce_sum");
    assert_eq!(values, [1.5, -2.0]);
    assert_eq!(ring.all_gather_bytes(b"abc").expect("all_gather_bytes"), vec![b"abc".to_vec()]);
    let mut buf = b"xyz".to_vec();
    ring.broadcast_bytes(&mut buf, 0).expect("broadcast_bytes");
    assert_eq!(buf, b"xyz");
    ring.barrier().expect("barrier");
    let err = ring.broadcast_bytes(&mut buf, 1).expect_err("root out of range");
    assert!(matches!(err, CommError::InvalidArgument { .. }), "{err}");
}

#[test]
fn invalid_arguments_are_refused() {
    let (mut listeners, peers) = bind_listeners(2);
    let second = listeners.pop().expect("listener");
    let first = listeners.pop().expect("listener");
    let err = TcpRing::connect(first, 2, &peers, 1, Duration::from_secs(1)).expect_err("rank out of range");
    assert!(err.to_string().contains("rank 2 out of range for world size 2"), "{err}");
    let err = TcpRing::connect(second, 1, &peers, 1, Duration::ZERO).expect_err("zero timeout");
    assert!(matches!(err, CommError::InvalidArgument { .. }), "{err}");
}

#[test]
fn connect_gives_up_on_a_missing_neighbour_at_the_deadline() {
    let (mut listeners, peers) = bind_listeners(2);
    drop(listeners.pop()); // rank 1 never comes up: connections to it are refused
    let listener = listeners.pop().expect("listener");
    let start = Instant::now();
    let err = TcpRing::connect(listener, 0, &peers, 1, Duration::from_millis(300)).expect_err("no neighbour");
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
    assert_eq!(err.peer_rank(), Some(1), "{err}");
    assert!(err.to_string().contains("connect: peer rank 1"), "{err}");
}

#[test]
fn handshake_with_another_generation_is_refused() {
    let results = run_ranks(2, |rank, listener, peers| {
        TcpRing::connect(listener, rank, peers, 10 + rank as u64, Duration::from_millis(500))
    });
    for (rank, result) in results.into_iter().enumerate() {
        let err = result.expect_err("generations differ");
        let message = err.to_string();
        assert!(matches!(err, CommError::Handshake { .. }), "rank {rank}: {message}");
        assert!(message.contains("generation"), "rank {rank}: {message}");
    }
}

#[test]
fn stray_connections_are_rejected_and_the_ring_still_forms() {
    let (listeners, peers) = bind_listeners(2);
    // Queued on rank 0's listener before the real neighbour: a straggler of an older generation and
    // a probe that connects and leaves.
    let mut straggler = std::net::TcpStream::connect(&peers[0]).expect("straggler connect");
    (&straggler).write_all(&Hello::new(0, 1, 2).encode()).expect("straggler hello");
    drop(std::net::TcpStream::connect(&peers[0]).expect("probe connect"));

    let sums = run_listeners(listeners, &peers, |rank, listener, peers| {
        let mut ring = TcpRing::connect(listener, rank, peers, 1, TEST_TIMEOUT).expect("ring forms");
        let mut v = vec![rank as f64 + 1.0];
        ring.all_reduce_sum(&mut v).expect("all_reduce_sum");
        v[0]
    });
    assert_eq!(sums, [3.0, 3.0]);
    let mut rest = Vec::new();
    straggler.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
    let read = straggler.read_to_end(&mut rest);
    assert!(matches!(read, Ok(0)) || read.is_err(), "straggler got an answer: {read:?} {rest:?}");
}

fn assert_names_a_peer(rank: usize, err: &CommError, elapsed: Duration) {
    let message = err.to_string();
    assert!(elapsed < Duration::from_secs(5), "rank {rank} took {elapsed:?}: {message}");
    assert!(err.peer_rank().is_some() && message.contains("peer rank"), "rank {rank}: {message}");
}

#[test]
fn a_rank_that_leaves_mid_run_makes_the_others_fail_fast() {
    let results = with_rings(3, Duration::from_secs(1), |mut ring| {
        let mut buf = vec![1.0f32; 10_000];
        ring.all_reduce_sum(&mut buf).expect("first all_reduce_sum");
        if ring.rank() == 2 {
            drop(ring);
            return None;
        }
        let start = Instant::now();
        let result = ring.all_reduce_sum(&mut buf);
        Some((result, start.elapsed()))
    });
    for (rank, outcome) in results.into_iter().enumerate().take(2) {
        let (result, elapsed) = outcome.expect("ranks 0 and 1 ran the second all_reduce_sum");
        assert_names_a_peer(rank, &result.expect_err("rank 2 left"), elapsed);
    }
}

#[test]
fn a_rank_that_stops_calling_makes_the_others_time_out_and_poisons_the_ring() {
    let done = Barrier::new(3);
    let results = with_rings(3, Duration::from_secs(1), |mut ring| {
        let mut buf = vec![1.0f64; 1000];
        ring.all_reduce_sum(&mut buf).expect("first all_reduce_sum");
        if ring.rank() == 2 {
            done.wait(); // holds its ring open, silent, until the others have failed
            return None;
        }
        let start = Instant::now();
        let result = ring.all_reduce_sum(&mut buf);
        let elapsed = start.elapsed();
        let again = ring.all_reduce_sum(&mut buf);
        done.wait();
        Some((result, elapsed, again))
    });
    let mut timed_out = false;
    for (rank, outcome) in results.into_iter().enumerate().take(2) {
        let (result, elapsed, again) = outcome.expect("ranks 0 and 1 ran");
        let err = result.expect_err("rank 2 is silent");
        assert_names_a_peer(rank, &err, elapsed);
        // Rank 0 waits on rank 2 (its left neighbour) and times out; rank 1 then sees rank 0 close.
        timed_out |= err.is_timeout();
        let again = again.expect_err("poisoned");
        assert!(matches!(again, CommError::Poisoned { .. }), "rank {rank}: {again}");
    }
    assert!(timed_out, "no rank reported a timeout");
}

#[test]
fn buffers_of_different_lengths_are_a_protocol_error() {
    let results = with_rings(2, Duration::from_secs(2), |mut ring| {
        let mut buf = vec![1.0f32; 4 + ring.rank()];
        ring.all_reduce_sum(&mut buf)
    });
    let messages: Vec<String> = results.into_iter().map(|r| r.expect_err("lengths differ").to_string()).collect();
    assert!(
        messages.iter().any(|m| m.contains("protocol error with peer rank") && m.contains("same length")),
        "{messages:?}"
    );
}

#[test]
fn different_element_types_are_a_protocol_error() {
    let results = with_rings(2, Duration::from_secs(2), |mut ring| {
        if ring.rank() == 0 { ring.all_reduce_sum(&mut [1.0f32; 4]) } else { ring.all_reduce_sum(&mut [1.0f64; 2]) }
    });
    // The first rank to notice shuts its sockets down, so the other may see a closed connection.
    let messages: Vec<String> = results.into_iter().map(|r| r.expect_err("types differ").to_string()).collect();
    assert!(messages.iter().any(|m| m.contains("element type")), "{messages:?}");
}

#[test]
fn collectives_called_in_a_different_order_are_a_protocol_error() {
    let results = with_rings(3, Duration::from_secs(2), |mut ring| {
        if ring.rank() == 1 { ring.barrier() } else { ring.all_gather_bytes(b"x").map(|_| ()) }
    });
    let messages: Vec<String> = results.into_iter().filter_map(|r| r.err()).map(|e| e.to_string()).collect();
    assert!(messages.iter().any(|m| m.contains("different order")), "{messages:?}");
}

#[test]
#[ignore = "measurement: cargo test -p hcmoco-worker --lib bandwidth -- --ignored --nocapture"]
fn all_reduce_bandwidth_two_ranks_16mib_f32() {
    const LEN: usize = 4 << 20; // 16 MiB of f32
    const WARMUP: usize = 2;
    const ITERATIONS: usize = 10;
    with_rings(2, Duration::from_secs(60), |mut ring| {
        let mut buf = vec![1.0f32; LEN];
        for _ in 0..WARMUP {
            ring.all_reduce_sum(&mut buf).expect("warm-up");
        }
        ring.barrier().expect("barrier");
        let start = Instant::now();
        for _ in 0..ITERATIONS {
            ring.all_reduce_sum(&mut buf).expect("all_reduce_sum");
        }
        let per_op = start.elapsed().as_secs_f64() / ITERATIONS as f64;
        if ring.rank() == 0 {
            let bytes = (LEN * 4) as f64;
            println!(
                "all_reduce_sum 2 ranks, 16 MiB f32: {:.2} ms per op, algorithm bandwidth {:.2} GB/s, bus bandwidth {:.2} GB/s",
                per_op * 1e3,
                bytes / per_op / 1e9,
                bytes / per_op / 1e9 // 2 (W - 1) / W = 1 for W = 2
            );
        }
    });
}

proptest! {
    #[test]
    fn chunks_partition_the_buffer(len in 0usize..10_000, parts in 1usize..9) {
        let mut next = 0;
        for i in 0..parts {
            let r = chunk_range(len, parts, i);
            prop_assert_eq!(r.start, next);
            prop_assert!(r.len() == len / parts || r.len() == len / parts + 1);
            next = r.end;
        }
        prop_assert_eq!(next, len);
    }

    #[test]
    fn split_pair_borrows_the_requested_ranges(len in 0usize..50, parts in 2usize..7, a in 0usize..7, b in 0usize..7) {
        let (a, b) = (a % parts, b % parts);
        prop_assume!(a != b);
        let mut buf: Vec<usize> = (0..len).collect();
        let (ra, rb) = (chunk_range(len, parts, a), chunk_range(len, parts, b));
        let (shared, exclusive) = split_pair(&mut buf, ra.clone(), rb.clone());
        prop_assert_eq!(shared, &ra.collect::<Vec<_>>()[..]);
        prop_assert_eq!(&*exclusive, &rb.collect::<Vec<_>>()[..]);
    }
}
