use std::io::{Read, Write};
use std::sync::Barrier;
use std::sync::atomic::{AtomicUsize, Ordering};

use half::bf16;

use super::*;
use crate::comm::frame::Hello;
use crate::comm::options::DEFAULT_SEGMENT_BYTES;
use crate::comm::testing::{
    TEST_TIMEOUT, TRANSPORTS, bind_listeners, one_host, options, pseudo_random, run_listeners, run_ranks, with_rings,
    with_rings_over, with_rings_using,
};

/// Buffer lengths worth testing for a world size: empty, shorter than W, not divisible by W, more
/// than one pipeline segment per chunk.
fn lengths(world: usize) -> Vec<usize> {
    let mut v = vec![0, 1, 2, 3, world - 1, world + 1, 2 * world + 1, 1000, 4099, 65_537, 100_003];
    v.sort_unstable();
    v.dedup();
    v
}

/// The arithmetic of the reference, written independently of the kernels: f32 and f64 natively, bf16
/// through f32 and `half`'s rounding.
trait Reference: Element + std::fmt::Debug {
    fn from_f64(x: f64) -> Self;
    fn plus(a: Self, b: Self) -> Self;
    fn plus_then_divide(a: Self, b: Self, w: usize) -> Self;
    fn bits(v: &[Self]) -> Vec<u64>;
}

impl Reference for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn plus(a: Self, b: Self) -> Self {
        a + b
    }
    fn plus_then_divide(a: Self, b: Self, w: usize) -> Self {
        (a + b) / w as f32
    }
    fn bits(v: &[Self]) -> Vec<u64> {
        v.iter().map(|x| u64::from(x.to_bits())).collect()
    }
}

impl Reference for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn plus(a: Self, b: Self) -> Self {
        a + b
    }
    fn plus_then_divide(a: Self, b: Self, w: usize) -> Self {
        (a + b) / w as f64
    }
    fn bits(v: &[Self]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}

impl Reference for bf16 {
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
    fn plus(a: Self, b: Self) -> Self {
        bf16::from_f32(a.to_f32() + b.to_f32())
    }
    fn plus_then_divide(a: Self, b: Self, w: usize) -> Self {
        bf16::from_f32((a.to_f32() + b.to_f32()) / w as f32)
    }
    fn bits(v: &[Self]) -> Vec<u64> {
        v.iter().map(|x| u64::from(x.to_bits())).collect()
    }
}

/// The reduction over `inputs` (one per rank) in ring order: chunk c is summed starting at rank c + 1
/// and finished (and averaged) at rank c.
fn ring_reference<T: Reference>(inputs: &[Vec<T>], op: ReduceOp) -> Vec<T> {
    let world = inputs.len();
    let len = inputs[0].len();
    let mut out = inputs[0].clone();
    for c in 0..world {
        for i in chunk_range(len, world, c) {
            let mut acc = inputs[(c + 1) % world][i];
            for k in 2..=world {
                let x = inputs[(c + k) % world][i];
                acc = if k == world && op == ReduceOp::Average {
                    T::plus_then_divide(x, acc, world)
                } else {
                    T::plus(x, acc)
                };
            }
            out[i] = acc;
        }
    }
    out
}

/// Inputs with rounding at every step: random values scaled differently per rank.
fn random_inputs<T: Reference>(world: usize, len: usize, seed: u64) -> Vec<Vec<T>> {
    (0..world)
        .map(|r| {
            pseudo_random(seed * 31 + r as u64, len).into_iter().map(|x| T::from_f64(x * (1 + r * 7) as f64)).collect()
        })
        .collect()
}

fn check_reductions<T: Reference>(ring: &mut TcpRing, seed: u64) {
    let (rank, world) = (ring.rank(), ring.world_size());
    for len in lengths(world) {
        let inputs = random_inputs::<T>(world, len, seed + len as u64);
        for op in [ReduceOp::Sum, ReduceOp::Average] {
            let what = format!("{:?}, rank {rank} of {world}, {} len {len}, {op:?}", ring.transports(), T::DTYPE);
            let expected = ring_reference(&inputs, op);
            let mut buf = inputs[rank].clone();
            ring.all_reduce(&mut buf, op).unwrap_or_else(|e| panic!("{what}: all_reduce: {e}"));
            assert!(T::bits(&buf) == T::bits(&expected), "{what}: all_reduce differs from the ring-order reference");
            let mine = chunk_range(len, world, rank);
            let mut out = vec![T::from_f64(7.0); mine.len()];
            ring.reduce_scatter(&inputs[rank], &mut out, op).unwrap_or_else(|e| panic!("{what}: reduce_scatter: {e}"));
            assert!(T::bits(&out) == T::bits(&expected[mine]), "{what}: reduce_scatter differs from the reference");
        }
    }
}

#[test]
fn reductions_match_the_ring_order_reference_for_world_sizes_1_to_5_over_both_transports() {
    for transport in TRANSPORTS {
        for world in 1..=5 {
            with_rings_over(world, transport, TEST_TIMEOUT, |mut ring| {
                check_reductions::<f32>(&mut ring, 1);
                check_reductions::<f64>(&mut ring, 2);
                check_reductions::<bf16>(&mut ring, 3);
            });
        }
    }
}

#[test]
fn a_million_values_reduce_bit_identically_on_every_rank_and_close_to_the_exact_sum() {
    const LEN: usize = (1 << 20) + 3;
    for transport in TRANSPORTS {
        for world in [2, 3, 5] {
            let inputs32 = random_inputs::<f32>(world, LEN, 11);
            let inputs16 = random_inputs::<bf16>(world, LEN, 12);
            let results = with_rings_over(world, transport, TEST_TIMEOUT, |mut ring| {
                let mut single = inputs32[ring.rank()].clone();
                let mut brain = inputs16[ring.rank()].clone();
                ring.all_reduce(&mut single, ReduceOp::Sum).expect("f32 all_reduce");
                ring.all_reduce(&mut brain, ReduceOp::Average).expect("bf16 all_reduce");
                (single, brain)
            });
            let (single0, brain0) = &results[0];
            for (rank, (single, brain)) in results.iter().enumerate().skip(1) {
                assert!(
                    f32::bits(single) == f32::bits(single0),
                    "{transport:?} world {world}: rank {rank} f32 differs"
                );
                assert!(
                    bf16::bits(brain) == bf16::bits(brain0),
                    "{transport:?} world {world}: rank {rank} bf16 differs"
                );
            }
            for i in (0..LEN).step_by(97) {
                let exact: f64 = inputs32.iter().map(|v| f64::from(v[i])).sum();
                assert!((f64::from(single0[i]) - exact).abs() <= 1e-5 * (1.0 + exact.abs()), "f32 element {i}");
                let mean: f64 = inputs16.iter().map(|v| v[i].to_f64()).sum::<f64>() / world as f64;
                // A bf16 step rounds to 8 bits of mantissa: a few ulps of the largest input.
                let scale = inputs16.iter().map(|v| v[i].to_f64().abs()).fold(1.0, f64::max);
                assert!((brain0[i].to_f64() - mean).abs() <= 0.02 * scale, "bf16 element {i}");
            }
        }
    }
}

fn block(rank: usize, round: usize) -> Vec<u8> {
    let len = match (rank + round) % 4 {
        0 => 0,
        1 => 1,
        2 => 37,
        _ => 3 * DEFAULT_SEGMENT_BYTES + 11,
    };
    (0..len).map(|i| (i * 13 + rank * 7 + round) as u8).collect()
}

#[test]
fn all_gather_bytes_returns_every_ranks_block_in_rank_order() {
    for transport in TRANSPORTS {
        for world in 1..=5 {
            let results = with_rings_over(world, transport, TEST_TIMEOUT, |mut ring| {
                (0..4)
                    .map(|round| ring.all_gather_bytes(&block(ring.rank(), round)).expect("all_gather_bytes"))
                    .collect::<Vec<_>>()
            });
            for (rank, rounds) in results.iter().enumerate() {
                for (round, gathered) in rounds.iter().enumerate() {
                    let expected: Vec<Vec<u8>> = (0..world).map(|r| block(r, round)).collect();
                    assert!(gathered == &expected, "{transport:?} world {world}, rank {rank}, round {round}");
                }
            }
        }
    }
}

#[test]
fn broadcast_bytes_from_every_root() {
    for transport in TRANSPORTS {
        for world in 1..=5 {
            with_rings_over(world, transport, TEST_TIMEOUT, |mut ring| {
                for root in 0..world {
                    for len in [0, 1, 1000, 3 * DEFAULT_SEGMENT_BYTES + 5] {
                        let expected: Vec<u8> = (0..len).map(|i| (i * 3 + root * 11 + len) as u8).collect();
                        let mut buf = if ring.rank() == root { expected.clone() } else { vec![0xAB; 17] };
                        ring.broadcast_bytes(&mut buf, root).expect("broadcast_bytes");
                        assert!(
                            buf == expected,
                            "{transport:?} world {world}, rank {}, root {root}, len {len}",
                            ring.rank()
                        );
                    }
                }
            });
        }
    }
}

#[test]
fn barrier_returns_only_after_every_rank_arrived() {
    const ROUNDS: usize = 5;
    for transport in TRANSPORTS {
        for world in 1..=5 {
            let arrived = AtomicUsize::new(0);
            with_rings_over(world, transport, TEST_TIMEOUT, |mut ring| {
                for round in 1..=ROUNDS {
                    arrived.fetch_add(1, Ordering::SeqCst);
                    ring.barrier().expect("barrier");
                    assert!(arrived.load(Ordering::SeqCst) >= world * round, "world {world}, round {round}");
                }
            });
        }
    }
}

#[test]
fn world_of_one_needs_no_peer() {
    let (mut listeners, peers) = bind_listeners(1);
    let listener = listeners.pop().expect("one listener");
    let mut ring = TcpRing::connect(listener, 0, &peers, 3, Duration::from_millis(100)).expect("connect");
    assert_eq!(ring.transports(), None);
    let mut values = vec![1.5f32, -2.0];
    ring.all_reduce_sum(&mut values).expect("all_reduce_sum");
    assert_eq!(values, [1.5, -2.0]);
    ring.all_reduce(&mut values, ReduceOp::Average).expect("average");
    assert_eq!(values, [1.5, -2.0]);
    let mut out = [0.0f32; 2];
    ring.reduce_scatter(&values, &mut out, ReduceOp::Average).expect("reduce_scatter");
    assert_eq!(out, [1.5, -2.0]);
    assert_eq!(ring.all_gather_bytes(b"abc").expect("all_gather_bytes"), vec![b"abc".to_vec()]);
    let mut buf = b"xyz".to_vec();
    ring.broadcast_bytes(&mut buf, 0).expect("broadcast_bytes");
    assert_eq!(buf, b"xyz");
    ring.barrier().expect("barrier");
    let err = ring.broadcast_bytes(&mut buf, 1).expect_err("root out of range");
    assert!(matches!(err, CommError::InvalidArgument { .. }), "{err}");
    ring.abort_handle().abort("test");
    let err = ring.barrier().expect_err("aborted");
    assert!(matches!(err, CommError::Aborted { .. }), "{err}");
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

    // Shared memory with a neighbour on another host is refused before any connection is made.
    let (mut listeners, peers) = bind_listeners(2);
    let mut infos = one_host(&peers);
    infos[1].host_id = "elsewhere".to_owned();
    let opts = options(Transport::Shm, Duration::from_secs(1));
    let err = TcpRing::connect_with(listeners.remove(0), 0, &infos, 1, &opts).expect_err("other host");
    assert!(err.to_string().contains("rank 1 is on host \"elsewhere\""), "{err}");
}

#[test]
fn reduce_scatter_refuses_an_output_of_the_wrong_length() {
    with_rings_over(2, Transport::Tcp, TEST_TIMEOUT, |mut ring| {
        // Of 5 elements, rank 0 gets 3 and rank 1 gets 2.
        let mut out = vec![0.0f32; 2 + ring.rank()];
        let err = ring.reduce_scatter(&[1.0f32; 5], &mut out, ReduceOp::Sum).expect_err("wrong output length");
        assert!(matches!(err, CommError::InvalidArgument { .. }), "{err}");
        ring.barrier().expect("the ring is still usable");
    });
}

#[test]
fn auto_uses_shared_memory_on_one_host_and_tcp_across_hosts() {
    // Ranks 0 and 1 on host a, rank 2 on host b: 0 -> 1 is shared memory, 1 -> 2 and 2 -> 0 are tcp.
    let results = run_ranks(3, |rank, listener, peers| {
        let mut infos = one_host(peers);
        infos[2].host_id = "b".to_owned();
        let mut ring =
            TcpRing::connect_with(listener, rank, &infos, 1, &options(Transport::Auto, TEST_TIMEOUT)).expect("connect");
        let mut buf = vec![rank as f32 + 1.0; 100_001];
        ring.all_reduce(&mut buf, ReduceOp::Sum).expect("all_reduce");
        assert!(buf.iter().all(|&x| x == 6.0));
        ring.transports().expect("links")
    });
    assert_eq!(
        results,
        [(Transport::Tcp, Transport::Shm), (Transport::Shm, Transport::Tcp), (Transport::Tcp, Transport::Tcp)]
    );
}

#[test]
fn auto_falls_back_to_tcp_when_shared_memory_cannot_be_set_up() {
    let results = run_ranks(2, |rank, listener, peers| {
        let opts = CpuOptions {
            shm_dir: std::path::PathBuf::from("/nonexistent/hcmoco-shm"),
            ..options(Transport::Auto, TEST_TIMEOUT)
        };
        let mut ring = TcpRing::connect_with(listener, rank, &one_host(peers), 1, &opts).expect("connect");
        ring.barrier().expect("barrier");
        ring.transports()
    });
    assert_eq!(results, [Some((Transport::Tcp, Transport::Tcp)); 2]);
}

#[test]
fn shared_memory_files_are_unlinked_once_mapped_and_nothing_is_left_after_drop() {
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("tempdir");
    let listing = || std::fs::read_dir(dir.path()).expect("list").count();
    let synced = Barrier::new(3);
    let files_while_connected = AtomicUsize::new(usize::MAX);
    run_ranks(3, |rank, listener, peers| {
        let opts = CpuOptions { shm_dir: dir.path().to_owned(), ..options(Transport::Shm, TEST_TIMEOUT) };
        let mut ring = TcpRing::connect_with(listener, rank, &one_host(peers), 1, &opts).expect("connect");
        let mut buf = vec![1.0f64; 70_000];
        ring.all_reduce(&mut buf, ReduceOp::Sum).expect("all_reduce");
        synced.wait();
        files_while_connected.fetch_min(listing(), Ordering::SeqCst);
        synced.wait();
    });
    assert_eq!(files_while_connected.load(Ordering::SeqCst), 0, "ring files are unlinked once both ends map them");
    assert_eq!(listing(), 0);
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
        // A generous deadline: under load a rank thread may start late, and the refusal must still be
        // the generation mismatch rather than a missing neighbour.
        TcpRing::connect(listener, rank, peers, 10 + rank as u64, Duration::from_secs(3))
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

fn assert_names_a_peer(what: &str, rank: usize, err: &CommError, elapsed: Duration, limit: Duration) {
    let message = err.to_string();
    assert!(elapsed < limit, "{what}: rank {rank} took {elapsed:?}: {message}");
    assert!(err.peer_rank().is_some() && message.contains("peer rank"), "{what}: rank {rank}: {message}");
}

#[test]
fn a_rank_that_leaves_makes_the_others_fail_fast_naming_it() {
    for transport in TRANSPORTS {
        let results = with_rings_over(4, transport, Duration::from_secs(10), |mut ring| {
            let mut buf = vec![1.0f32; 10_000];
            ring.all_reduce_sum(&mut buf).expect("first all_reduce_sum");
            if ring.rank() == 3 {
                drop(ring);
                return None;
            }
            let start = Instant::now();
            let result = ring.all_reduce_sum(&mut buf);
            Some((result, start.elapsed()))
        });
        for (rank, outcome) in results.into_iter().enumerate().take(3) {
            let (result, elapsed) = outcome.expect("ranks 0 to 2 ran the second all_reduce_sum");
            let err = result.expect_err("rank 3 left");
            let what = format!("{transport:?}");
            // Well within the 10 s timeout: nobody waits for it.
            assert_names_a_peer(&what, rank, &err, elapsed, Duration::from_secs(3));
            assert_eq!(err.peer_rank(), Some(3), "{what}: rank {rank}: {err}");
            if rank == 1 {
                // Not a neighbour of rank 3: it learns of the failure from one that is.
                assert!(matches!(err, CommError::Reported { reporter: 0 | 2, .. }), "{what}: {err}");
                assert!(err.to_string().contains("reported: peer rank 3"), "{what}: {err}");
            }
        }
    }
}

#[test]
fn a_rank_that_stops_calling_makes_the_others_time_out_and_poisons_the_ring() {
    for transport in TRANSPORTS {
        let done = Barrier::new(3);
        let results = with_rings_over(3, transport, Duration::from_millis(800), |mut ring| {
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
            assert_names_a_peer(&format!("{transport:?}"), rank, &err, elapsed, Duration::from_secs(3));
            // Rank 0 waits on rank 2 (its left neighbour) and times out; rank 1 hears it from rank 0.
            timed_out |= err.is_timeout();
            let again = again.expect_err("poisoned");
            assert!(matches!(again, CommError::Poisoned { .. }), "rank {rank}: {again}");
        }
        assert!(timed_out, "{transport:?}: no rank reported a timeout");
    }
}

#[test]
fn abort_wakes_a_blocked_all_reduce_at_once_and_the_others_learn_why() {
    for transport in TRANSPORTS {
        let release = Barrier::new(2);
        let results = with_rings_over(2, transport, TEST_TIMEOUT, |mut ring| {
            let mut buf = vec![1.0f32; 4 << 20];
            if ring.rank() == 1 {
                // Silent until rank 0 has been aborted; then its own call fails at once.
                release.wait();
                let start = Instant::now();
                let err = ring.all_reduce_sum(&mut buf).expect_err("rank 0 aborted");
                return (err, start.elapsed(), None);
            }
            let handle = ring.abort_handle();
            let running = ring.running_probe();
            std::thread::scope(|scope| {
                let aborter = scope.spawn(move || {
                    while !running() {
                        std::thread::yield_now();
                    }
                    let at = Instant::now();
                    handle.abort("generation 2 opened");
                    at
                });
                let err = ring.all_reduce_sum(&mut buf).expect_err("aborted");
                let aborted_at = aborter.join().expect("aborter");
                let later = ring.barrier().expect_err("poisoned after an abort");
                assert!(matches!(later, CommError::Poisoned { .. }), "{later}");
                release.wait();
                (err, aborted_at.elapsed(), Some(later))
            })
        });
        let (err, elapsed, _) = &results[0];
        assert!(matches!(err, CommError::Aborted { op: "all_reduce_sum", .. }), "{transport:?}: {err}");
        assert!(err.to_string().contains("generation 2 opened"), "{err}");
        assert!(*elapsed < Duration::from_secs(1), "{transport:?}: abort took {elapsed:?}");
        let (err, elapsed, _) = &results[1];
        assert!(*elapsed < Duration::from_secs(2), "{transport:?}: rank 1 took {elapsed:?}: {err}");
        assert!(
            matches!(err, CommError::Reported { reporter: 0, failed_rank: None, .. }) || err.peer_rank() == Some(0),
            "{transport:?}: {err}"
        );
    }
}

#[test]
fn an_abort_between_collectives_tells_the_neighbours() {
    for transport in TRANSPORTS {
        let aborted = Barrier::new(3);
        let results = with_rings_over(3, transport, TEST_TIMEOUT, |mut ring| {
            if ring.rank() == 1 {
                ring.abort_handle().abort("job cancelled");
            }
            aborted.wait();
            let start = Instant::now();
            let result = ring.barrier();
            (result, start.elapsed())
        });
        for (rank, (result, elapsed)) in results.into_iter().enumerate() {
            let err = result.expect_err("rank 1 was aborted");
            assert!(elapsed < Duration::from_secs(2), "{transport:?} rank {rank}: {elapsed:?}");
            if rank == 1 {
                assert!(matches!(err, CommError::Aborted { .. }), "{err}");
            } else {
                assert!(
                    err.to_string().contains("rank 1 reported: aborted: job cancelled") || err.peer_rank().is_some(),
                    "{transport:?} rank {rank}: {err}"
                );
            }
        }
    }
}

#[test]
fn buffers_of_different_lengths_are_a_protocol_error() {
    for transport in TRANSPORTS {
        let results = with_rings_over(2, transport, Duration::from_secs(2), |mut ring| {
            let mut buf = vec![1.0f32; 4 + ring.rank()];
            ring.all_reduce_sum(&mut buf)
        });
        let messages: Vec<String> = results.into_iter().map(|r| r.expect_err("lengths differ").to_string()).collect();
        assert!(
            messages.iter().any(|m| m.contains("protocol error with peer rank") && m.contains("same length")),
            "{messages:?}"
        );
    }
}

#[test]
fn different_element_types_or_reductions_are_a_protocol_error() {
    for transport in TRANSPORTS {
        let results = with_rings_over(2, transport, Duration::from_secs(2), |mut ring| {
            if ring.rank() == 0 { ring.all_reduce_sum(&mut [1.0f32; 4]) } else { ring.all_reduce_sum(&mut [1.0f64; 2]) }
        });
        // The first rank to notice tells the other, which reports that.
        let messages: Vec<String> = results.into_iter().map(|r| r.expect_err("types differ").to_string()).collect();
        assert!(messages.iter().any(|m| m.contains("element type")), "{messages:?}");

        let results = with_rings_over(2, transport, Duration::from_secs(2), |mut ring| {
            let op = if ring.rank() == 0 { ReduceOp::Sum } else { ReduceOp::Average };
            ring.all_reduce(&mut [1.0f32; 4], op)
        });
        let messages: Vec<String> =
            results.into_iter().map(|r| r.expect_err("reductions differ").to_string()).collect();
        assert!(messages.iter().any(|m| m.contains("reduction")), "{messages:?}");
    }
}

#[test]
fn collectives_called_in_a_different_order_are_a_protocol_error() {
    for transport in TRANSPORTS {
        let results = with_rings_over(3, transport, Duration::from_secs(2), |mut ring| {
            if ring.rank() == 1 { ring.barrier() } else { ring.all_gather_bytes(b"x").map(|_| ()) }
        });
        let messages: Vec<String> = results.into_iter().filter_map(|r| r.err()).map(|e| e.to_string()).collect();
        assert!(messages.iter().any(|m| m.contains("different order")), "{messages:?}");
    }
}

#[test]
fn tcp_connect_still_forms_a_tcp_ring() {
    with_rings(3, TEST_TIMEOUT, |mut ring| {
        assert_eq!(ring.transports(), Some((Transport::Tcp, Transport::Tcp)));
        let mut v = vec![1.0f32; 5];
        ring.all_reduce_sum(&mut v).expect("all_reduce_sum");
        assert_eq!(v, [3.0; 5]);
    });
}

/// Median time of `rounds` calls of `f`, after a warm-up.
fn median_seconds(rounds: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..2 {
        f();
    }
    let mut times: Vec<f64> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Pins the calling thread to one CPU (measurements only: ranks on distinct cores).
fn pin_to_cpu(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu % std::thread::available_parallelism().map_or(1, |n| n.get()));
    rustix::thread::sched_setaffinity(None, &set).expect("sched_setaffinity");
}

#[test]
#[ignore = "measurement: CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo test -p hcmoco-worker --lib bandwidth -- --ignored --nocapture"]
fn all_reduce_bandwidth_and_latency_two_ranks() {
    for pinned in [false, true] {
        for transport in TRANSPORTS {
            let opts = options(transport, Duration::from_secs(60));
            with_rings_using(2, &opts, |mut ring| {
                if pinned {
                    pin_to_cpu(ring.rank());
                }
                let label = format!("{transport:?}{}", if pinned { " pinned" } else { "" });
                for (bytes, rounds) in [(16usize << 20, 21), (64 << 20, 9)] {
                    let mut buf = vec![1.0f32; bytes / 4];
                    ring.barrier().expect("barrier");
                    let per_op = median_seconds(rounds, || ring.all_reduce_sum(&mut buf).expect("all_reduce_sum"));
                    if ring.rank() == 0 {
                        // Bus bandwidth = algorithm bandwidth x 2 (W - 1) / W = algorithm bandwidth for W = 2.
                        println!(
                            "{label} all_reduce 2 ranks f32 bytes={bytes} time_ms={:.2} algbw_GBps={:.2} busbw_GBps={:.2}",
                            per_op * 1e3,
                            bytes as f64 / per_op / 1e9,
                            bytes as f64 / per_op / 1e9
                        );
                    }
                }
                let mut brain = vec![bf16::ONE; (16 << 20) / 2];
                let per_op = median_seconds(9, || ring.all_reduce_sum(&mut brain).expect("bf16 all_reduce_sum"));
                if ring.rank() == 0 {
                    println!(
                        "{label} all_reduce 2 ranks bf16 bytes={} time_ms={:.2} busbw_GBps={:.2}",
                        16 << 20,
                        per_op * 1e3,
                        (16 << 20) as f64 / per_op / 1e9
                    );
                }
                for bytes in [8usize, 4096, 65536] {
                    let mut buf = vec![1.0f32; bytes / 4];
                    ring.barrier().expect("barrier");
                    let per_op = median_seconds(2001, || ring.all_reduce_sum(&mut buf).expect("all_reduce_sum"));
                    if ring.rank() == 0 {
                        println!("{label} all_reduce 2 ranks f32 bytes={bytes} latency_us={:.1}", per_op * 1e6);
                    }
                }
            });
        }
    }
}
