//! Test helpers: one scoped thread per rank, listeners bound to port 0 on loopback, both transports.

use std::net::TcpListener;
use std::time::Duration;

use super::options::{CpuOptions, PeerInfo, Transport};
use super::tcp::TcpRing;

/// Generous: correctness tests should never get near it.
pub(crate) const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// The transports every collective is tested over (threads of one process share one host).
pub(crate) const TRANSPORTS: [Transport; 2] = [Transport::Tcp, Transport::Shm];

pub(crate) fn bind_listeners(world: usize) -> (Vec<TcpListener>, Vec<String>) {
    let listeners: Vec<TcpListener> =
        (0..world).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback listener")).collect();
    let peers = listeners.iter().map(|l| l.local_addr().expect("listener address").to_string()).collect();
    (listeners, peers)
}

/// Every rank on one host.
pub(crate) fn one_host(peers: &[String]) -> Vec<PeerInfo> {
    peers.iter().map(|addr| PeerInfo { addr: addr.clone(), host_id: "test-host".to_owned() }).collect()
}

pub(crate) fn options(transport: Transport, timeout: Duration) -> CpuOptions {
    CpuOptions { transport, timeout, ..CpuOptions::default() }
}

/// Runs `f(rank, listener, peers)` on one thread per rank, with already bound listeners; returns the
/// results in rank order.
pub(crate) fn run_listeners<R: Send>(
    listeners: Vec<TcpListener>,
    peers: &[String],
    f: impl Fn(usize, TcpListener, &[String]) -> R + Sync,
) -> Vec<R> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let f = &f;
                scope.spawn(move || f(rank, listener, peers))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
    })
}

pub(crate) fn run_ranks<R: Send>(world: usize, f: impl Fn(usize, TcpListener, &[String]) -> R + Sync) -> Vec<R> {
    let (listeners, peers) = bind_listeners(world);
    run_listeners(listeners, &peers, f)
}

/// Forms a ring of `world` ranks (generation 1) on one host over `transport`, and runs `f` with each
/// rank's ring.
pub(crate) fn with_rings_over<R: Send>(
    world: usize,
    transport: Transport,
    timeout: Duration,
    f: impl Fn(TcpRing) -> R + Sync,
) -> Vec<R> {
    with_rings_using(world, &options(transport, timeout), f)
}

/// As `with_rings_over`, with all the options.
pub(crate) fn with_rings_using<R: Send>(world: usize, opts: &CpuOptions, f: impl Fn(TcpRing) -> R + Sync) -> Vec<R> {
    run_ranks(world, |rank, listener, peers| {
        let ring = TcpRing::connect_with(listener, rank, &one_host(peers), 1, opts)
            .unwrap_or_else(|e| panic!("rank {rank} failed to connect with {opts:?}: {e}"));
        if world > 1 && opts.transport != Transport::Auto {
            assert_eq!(ring.transports(), Some((opts.transport, opts.transport)), "rank {rank}");
        }
        f(ring)
    })
}

/// Forms a tcp ring of `world` ranks (generation 1) with `TcpRing::connect`.
pub(crate) fn with_rings<R: Send>(world: usize, timeout: Duration, f: impl Fn(TcpRing) -> R + Sync) -> Vec<R> {
    run_ranks(world, |rank, listener, peers| {
        let ring = TcpRing::connect(listener, rank, peers, 1, timeout)
            .unwrap_or_else(|e| panic!("rank {rank} failed to connect: {e}"));
        f(ring)
    })
}

/// Deterministic values in [-1, 1) (splitmix64).
pub(crate) fn pseudo_random(seed: u64, n: usize) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}
