//! `TcpRing`: one rank's ring of connections to its neighbours in one rendezvous generation, and its
//! collectives over host buffers (all-reduce, reduce-scatter, all-gather, broadcast, barrier; the
//! algorithms are in `ring`, run by the progress engine in `engine`). Despite the name, the data of a
//! link between ranks on the same host may flow through shared memory (`shm`); the tcp connection is
//! made in every case and carries the handshake, failure notices and liveness.
//!
//! Set-up: rank r connects to its right neighbour (r + 1) % W, retrying refused connections until the
//! deadline, sends a `Hello` and then accepts its left neighbour's connection on its own listener.
//! A connection whose hello is wrong (magic, version, generation, world size, sender rank) is logged,
//! closed and ignored, and the accept keeps waiting until the deadline: a stray probe or a straggler
//! of an older generation cannot take the place of the real neighbour. The accepting side answers a
//! good hello with its own, which the connecting side checks last. Connecting before accepting cannot
//! deadlock: every listener is bound before `connect` is called, so connections complete in the
//! kernel's backlog. Then each rank offers its right neighbour a transport for the data it will send
//! (a shared-memory ring it has just created, or tcp), reads and answers its left neighbour's offer,
//! and reads the answer to its own; an accepted ring file is unlinked at once (both ends have it mapped).
//!
//! Data: every message is cut into segments of at most `segment_bytes`, each a record (`RecordHeader`
//! and payload) on the tcp stream or in a shared-memory slot. Receivers check every header against the
//! collective they run (op, sequence number, step, element type, reduction, lengths), so ranks that
//! call collectives in a different order, or with different buffers, fail with a protocol error.
//!
//! Failure: no progress for the ring's timeout, a closed connection, a vanished neighbour process, a
//! protocol error or an abort makes the collective fail. The failing rank sends an abort notice (its
//! rank, the suspected rank, the reason) to both neighbours where the stream allows, shuts its
//! connections down and stays poisoned; a rank that receives a notice fails with
//! `CommError::Reported` and passes the notice on, so the whole ring fails fast and every rank can say
//! which rank reported what. Later calls return `Poisoned`.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::element::Element;
use super::engine::{self, Context, Plan};
use super::error::CommError;
use super::frame::{AbortNotice, HELLO_LEN, Hello, LinkOffer, LinkReply, MAX_LINK_TEXT, OFFER_LEN, OpCode, REPLY_LEN};
use super::link::{AbortState, Links, Liveness, Peer, RecordReader, Rx, TcpTx, Tx};
use super::options::{CpuOptions, PeerInfo, Transport};
use super::ring::{AllGather, AllReduce, Broadcast, ReduceScatter, chunk_range};
use super::shm::{ShmRing, ShmRx, ShmTx};
use super::{AbortHandle, ReduceOp};

const ACCEPT_POLL: Duration = Duration::from_millis(2);
/// How long an accepted connection may take to send its hello. A real neighbour sends it right after
/// connecting; the cap stops a silent stray connection from holding the accept until the deadline.
const HELLO_READ_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// A ring of connections between the ranks of one generation; see the module doc.
///
/// All ranks must call the collectives in the same order with matching arguments. Every call blocks
/// until this rank's part is done; a peer silent for longer than the timeout makes it fail.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world_size: usize,
    generation: u64,
    timeout: Duration,
    segment: usize,
    /// `None` for a world of one.
    links: Option<Links>,
    /// Number of collectives started; travels in every record header.
    seq: u64,
    /// Set by the first failed collective: the message of that error.
    poisoned: Option<String>,
    abort: Arc<AbortState>,
    /// Partial sums of `reduce_scatter`, kept between calls (u64 for alignment).
    work: Vec<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TcpRing {
    /// Forms the ring with tcp for all data: see the module doc. `peers[i]` is the collective address
    /// (`host:port`) of rank `i`; `listener` is this rank's own, already bound. Fails if the ring is not
    /// formed within `timeout`, which is also the longest a collective waits without progress.
    pub fn connect(
        listener: TcpListener,
        rank: usize,
        peers: &[String],
        generation: u64,
        timeout: Duration,
    ) -> Result<TcpRing, CommError> {
        let peers: Vec<PeerInfo> =
            peers.iter().map(|addr| PeerInfo { addr: addr.clone(), host_id: addr.clone() }).collect();
        let opts = CpuOptions { transport: Transport::Tcp, timeout, ..CpuOptions::default() };
        TcpRing::connect_with(listener, rank, &peers, generation, &opts)
    }

    /// Forms the ring; `opts.transport` picks tcp or shared memory for each link (see `Transport`).
    /// The listener is only borrowed: a worker keeps one for its life and forms a ring per generation.
    pub fn connect_with(
        listener: impl std::borrow::Borrow<TcpListener>,
        rank: usize,
        peers: &[PeerInfo],
        generation: u64,
        opts: &CpuOptions,
    ) -> Result<TcpRing, CommError> {
        const OP: &str = "connect";
        let world_size = peers.len();
        let timeout = opts.timeout;
        if world_size == 0 {
            return Err(CommError::InvalidArgument { op: OP, detail: "empty peer list".to_owned() });
        }
        if rank >= world_size {
            return Err(CommError::InvalidArgument {
                op: OP,
                detail: format!("rank {rank} out of range for world size {world_size}"),
            });
        }
        if timeout.is_zero() {
            return Err(CommError::InvalidArgument { op: OP, detail: "zero timeout".to_owned() });
        }
        let segment = opts.segment();
        let mut ring = TcpRing {
            rank,
            world_size,
            generation,
            timeout,
            segment,
            links: None,
            seq: 0,
            poisoned: None,
            abort: Arc::default(),
            work: Vec::new(),
        };
        if world_size == 1 {
            return Ok(ring);
        }

        let right_rank = (rank + 1) % world_size;
        let left_rank = (rank + world_size - 1) % world_size;
        let same_host = |r: usize| peers[r].host_id == peers[rank].host_id;
        if opts.transport == Transport::Shm {
            for r in [left_rank, right_rank] {
                if !same_host(r) {
                    return Err(CommError::InvalidArgument {
                        op: OP,
                        detail: format!(
                            "transport shm needs both neighbours on this host, but rank {r} is on host {:?} and rank {rank} on {:?}",
                            peers[r].host_id, peers[rank].host_id
                        ),
                    });
                }
            }
        }
        let deadline = Instant::now() + timeout;
        let right_addr = &peers[right_rank].addr;
        let left_addr = &peers[left_rank].addr;

        let right = connect_with_retry(right_addr, right_rank, deadline)?;
        set_timeouts(&right, remaining(deadline))?;
        (&right).write_all(&Hello::new(generation, rank, world_size).encode()).map_err(|e| CommError::Peer {
            op: OP,
            peer_rank: right_rank,
            peer_addr: right_addr.clone(),
            source: e,
        })?;

        let (left, left_hello) =
            accept_left(listener.borrow(), rank, left_rank, left_addr, generation, world_size, deadline)?;

        // The right neighbour answers once it has accepted us; an early close means it rejected us.
        let right_error = |detail: String| CommError::Handshake {
            rank,
            side: "right",
            peer_rank: right_rank,
            peer_addr: right_addr.clone(),
            detail,
        };
        let left_error = |detail: String| CommError::Handshake {
            rank,
            side: "left",
            peer_rank: left_rank,
            peer_addr: left_addr.clone(),
            detail,
        };
        set_timeouts(&right, remaining(deadline))?;
        let mut reply = [0u8; HELLO_LEN];
        (&right).read_exact(&mut reply).map_err(|e| {
            right_error(match e.kind() {
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                    "peer closed the connection instead of answering (it rejected this rank's hello, e.g. another generation or world size, or it exited)".to_owned()
                }
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "no answer before the deadline".to_owned(),
                _ => format!("reading the answer failed: {e}"),
            })
        })?;
        let right_hello = Hello::decode(&reply)
            .and_then(|h| h.check(&Hello::new(generation, right_rank, world_size)).map(|()| h))
            .map_err(right_error)?;

        // Link set-up: offer a transport to the right, answer the left's offer, read the answer.
        let want_shm = match opts.transport {
            Transport::Tcp => false,
            Transport::Shm => true,
            Transport::Auto => same_host(right_rank),
        };
        let mut offered = None;
        if want_shm {
            match ShmRing::create(&opts.shm_dir, generation, rank, right_rank, segment) {
                Ok(shm) => offered = Some(shm),
                Err(e) if opts.transport == Transport::Auto => tracing::warn!(
                    rank,
                    generation,
                    dir = %opts.shm_dir.display(),
                    error = %e,
                    "cannot create a shared-memory ring, using tcp"
                ),
                Err(e) => return Err(CommError::Local { op: OP, source: e }),
            }
        }
        let offer = LinkOffer {
            shm: offered.as_ref().and_then(|s: &ShmRing| s.path().map(|p| (p.display().to_string(), s.len() as u64))),
        };
        set_timeouts(&right, remaining(deadline))?;
        (&right).write_all(&offer.encode()).map_err(|e| right_error(format!("sending the link offer failed: {e}")))?;

        set_timeouts(&left, remaining(deadline))?;
        let left_offer = read_offer(&left).map_err(&left_error)?;
        let (rx, answer, rx_problem) = match left_offer {
            Some((path, len)) if opts.transport != Transport::Tcp => {
                match ShmRing::open(std::path::Path::new(&path), len, generation, left_rank, rank) {
                    Ok(shm) => (Rx::Shm(ShmRx::new(shm)), LinkReply { declined: None }, None),
                    Err(reason) => {
                        let problem = (opts.transport == Transport::Shm)
                            .then(|| format!("cannot map the shared-memory ring it offered: {reason}"));
                        (Rx::Tcp, LinkReply { declined: Some(reason) }, problem)
                    }
                }
            }
            Some(_) => (Rx::Tcp, LinkReply { declined: Some("this rank uses tcp".to_owned()) }, None),
            None => {
                let problem = (opts.transport == Transport::Shm)
                    .then(|| "it sends over tcp, and this rank requires shared memory".to_owned());
                (Rx::Tcp, LinkReply { declined: None }, problem)
            }
        };
        (&left).write_all(&answer.encode()).map_err(|e| left_error(format!("answering the link offer failed: {e}")))?;
        if let Some(problem) = rx_problem {
            return Err(left_error(problem));
        }

        let declined = read_reply(&right).map_err(&right_error)?;
        let tx = match (offered, declined) {
            (Some(mut shm), None) => {
                if let Err(e) = shm.unlink() {
                    tracing::warn!(rank, generation, error = %e, "cannot unlink the shared-memory ring file");
                }
                Tx::Shm(ShmTx::new(shm))
            }
            (Some(_), Some(reason)) if opts.transport == Transport::Shm => {
                return Err(right_error(format!("it declined the shared-memory ring: {reason}")));
            }
            (Some(_), Some(reason)) => {
                tracing::warn!(rank, generation, peer = right_rank, reason = %reason, "shared memory declined, using tcp");
                Tx::Tcp(TcpTx::default())
            }
            (None, _) => Tx::Tcp(TcpTx::default()),
        };

        for stream in [&right, &left] {
            stream
                .set_nodelay(true)
                .and_then(|()| stream.set_nonblocking(true))
                .map_err(|e| CommError::Local { op: OP, source: e })?;
        }
        ring.abort.arm(rank, &left, &right).map_err(|e| CommError::Local { op: OP, source: e })?;
        let links = Links {
            right: Peer {
                stream: right,
                rank: right_rank,
                addr: right_addr.clone(),
                liveness: Liveness::watch(right_hello.pid, right_hello.start_time),
            },
            left: Peer {
                stream: left,
                rank: left_rank,
                addr: left_addr.clone(),
                liveness: Liveness::watch(left_hello.pid, left_hello.start_time),
            },
            tx,
            rx,
            right_reader: RecordReader::default(),
            left_reader: RecordReader::default(),
            scratch: vec![0u64; segment / 8],
        };
        let (to_left, to_right) = links.transports();
        tracing::debug!(
            rank,
            generation,
            world_size,
            left = left_rank,
            right = right_rank,
            ?to_left,
            ?to_right,
            "ring connected"
        );
        ring.links = Some(links);
        Ok(ring)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How data flows (to the left neighbour, to the right one); `None` for a world of one.
    pub fn transports(&self) -> Option<(Transport, Transport)> {
        self.links.as_ref().map(Links::transports)
    }

    /// Whether an earlier collective failed (the ring is then unusable).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// A handle that aborts this ring from another thread (see `AbortHandle`).
    pub fn abort_handle(&self) -> AbortHandle {
        let state = self.abort.clone();
        AbortHandle::new(move |reason| state.abort(reason))
    }

    /// A probe that tells whether a collective of this ring is running (tests abort one meanwhile).
    #[cfg(test)]
    pub(crate) fn running_probe(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let state = self.abort.clone();
        move || state.is_running()
    }

    /// In-place sum over ranks (`all_reduce` with `ReduceOp::Sum`).
    pub fn all_reduce_sum<T: Element>(&mut self, buf: &mut [T]) -> Result<(), CommError> {
        self.all_reduce_as("all_reduce_sum", buf, ReduceOp::Sum)
    }

    /// In-place reduction over ranks: pipelined ring reduce-scatter, then all-gather. Every rank ends
    /// with bit-identical values (each chunk is reduced on one rank and copied to the others).
    pub fn all_reduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        self.all_reduce_as("all_reduce", buf, op)
    }

    /// Reduces `input` over ranks into `out`, this rank's chunk (`chunk_range(input.len(), W, rank)`).
    /// Runs only the reduce-scatter half of the ring; `input` is left as it is.
    pub fn reduce_scatter<T: Element>(&mut self, input: &[T], out: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        self.reduce_scatter_as("reduce_scatter", input, out, op)
    }

    /// Every rank's `local` bytes (lengths may differ), indexed by rank.
    pub fn all_gather_bytes(&mut self, local: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        self.all_gather_bytes_as("all_gather_bytes", local)
    }

    /// `root`'s bytes end up in `buf` on every rank (resized to root's length).
    pub fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CommError> {
        self.broadcast_bytes_as("broadcast_bytes", buf, root)
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&mut self) -> Result<(), CommError> {
        let mut plan = AllGather::new(Vec::new(), OpCode::Barrier, self.rank, self.world_size);
        self.run("barrier", &mut plan)
    }

    pub(crate) fn all_reduce_as<T: Element>(
        &mut self,
        op: &'static str,
        buf: &mut [T],
        reduce: ReduceOp,
    ) -> Result<(), CommError> {
        let mut plan = AllReduce::new(buf, self.rank, self.world_size, reduce);
        self.run(op, &mut plan)
    }

    pub(crate) fn reduce_scatter_as<T: Element>(
        &mut self,
        op: &'static str,
        input: &[T],
        out: &mut [T],
        reduce: ReduceOp,
    ) -> Result<(), CommError> {
        let expected = chunk_range(input.len(), self.world_size, self.rank).len();
        if out.len() != expected {
            return Err(CommError::InvalidArgument {
                op,
                detail: format!(
                    "output of {} elements, rank {}'s chunk of {} elements has {expected}",
                    out.len(),
                    self.rank,
                    input.len()
                ),
            });
        }
        if self.world_size == 1 {
            self.check_usable(op)?;
            out.copy_from_slice(input); // the sum (and the average) of one rank
            return Ok(());
        }
        let bytes = std::mem::size_of_val(input);
        let mut work = std::mem::take(&mut self.work);
        if work.len() * 8 < bytes {
            work = vec![0u64; bytes.div_ceil(8)];
        }
        let work_elems: &mut [T] =
            bytemuck::cast_slice_mut(&mut bytemuck::cast_slice_mut::<u64, u8>(&mut work)[..bytes]);
        let mut plan = ReduceScatter::new(input, work_elems, out, self.rank, self.world_size, reduce);
        let result = self.run(op, &mut plan);
        self.work = work;
        result
    }

    pub(crate) fn all_gather_bytes_as(&mut self, op: &'static str, local: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        let mut plan = AllGather::new(local.to_vec(), OpCode::AllGather, self.rank, self.world_size);
        self.run(op, &mut plan)?;
        Ok(plan.blocks)
    }

    pub(crate) fn broadcast_bytes_as(
        &mut self,
        op: &'static str,
        buf: &mut Vec<u8>,
        root: usize,
    ) -> Result<(), CommError> {
        let (rank, world) = (self.rank, self.world_size);
        if root >= world {
            return Err(CommError::InvalidArgument {
                op,
                detail: format!("root {root} out of range for world size {world}"),
            });
        }
        let mut plan = Broadcast::new(buf, rank, world, root);
        self.run(op, &mut plan)
    }

    /// Fails if an earlier collective failed or the ring was aborted (the first call after an abort
    /// tells the neighbours, unless the handle already did).
    fn check_usable(&mut self, op: &'static str) -> Result<(), CommError> {
        if let Some(cause) = &self.poisoned {
            return Err(CommError::Poisoned { op, cause: cause.clone() });
        }
        if let Some(reason) = self.abort.reason() {
            let err = CommError::Aborted { op, reason };
            self.fail(op, &err);
            return Err(err);
        }
        Ok(())
    }

    /// Runs one collective over the links (a no-op for a world of one), and poisons the ring if it fails.
    fn run<P: Plan>(&mut self, op: &'static str, plan: &mut P) -> Result<(), CommError> {
        self.check_usable(op)?;
        let abort = self.abort.clone();
        let Some(links) = self.links.as_mut() else {
            return Ok(());
        };
        self.seq += 1;
        let result = {
            let _running = lock(&abort.gate);
            let ctx = Context { op, seq: self.seq, timeout: self.timeout, segment: self.segment, abort: &abort };
            engine::run(links, plan, &ctx)
        };
        if let Err(e) = &result {
            self.fail(op, e);
        }
        result
    }

    /// Poisons the ring after `err`, tells the neighbours and shuts the connections down.
    fn fail(&mut self, op: &'static str, err: &CommError) {
        let notice = match err {
            CommError::Reported { reporter, failed_rank, reason, .. } => {
                AbortNotice { origin: *reporter, failed: *failed_rank, reason: reason.clone() }
            }
            CommError::Aborted { reason, .. } => {
                AbortNotice { origin: self.rank, failed: None, reason: format!("aborted: {reason}") }
            }
            other => {
                let message = other.to_string();
                let reason = message.strip_prefix(op).and_then(|m| m.strip_prefix(": ")).unwrap_or(&message);
                AbortNotice {
                    origin: self.rank,
                    failed: Some(other.peer_rank().unwrap_or(self.rank)),
                    reason: reason.to_owned(),
                }
            }
        };
        tracing::debug!(rank = self.rank, generation = self.generation, error = %err, "collective failed, ring closed");
        if let Some(links) = self.links.as_mut() {
            links.fail(&notice);
        }
        self.abort.mark_closed();
        self.poisoned = Some(err.to_string());
    }
}

impl Drop for TcpRing {
    fn drop(&mut self) {
        self.abort.mark_closed();
        if let Some(links) = &self.links {
            links.shutdown();
        }
    }
}

/// Reads a `LinkOffer`: `Some((path, length))` for a shared-memory ring, `None` for tcp.
fn read_offer(mut stream: &TcpStream) -> Result<Option<(String, u64)>, String> {
    let mut fixed = [0u8; OFFER_LEN];
    stream.read_exact(&mut fixed).map_err(|e| format!("reading the link offer failed: {e}"))?;
    let (shm, len, path_len) = LinkOffer::decode_fixed(&fixed)?;
    let mut path = vec![0u8; path_len];
    stream.read_exact(&mut path).map_err(|e| format!("reading the link offer failed: {e}"))?;
    let path = String::from_utf8(path).map_err(|_| "link offer names a path that is not UTF-8".to_owned())?;
    Ok(shm.then_some((path, len)))
}

/// Reads a `LinkReply`: the reason if the offer was declined.
fn read_reply(mut stream: &TcpStream) -> Result<Option<String>, String> {
    let mut fixed = [0u8; REPLY_LEN];
    stream.read_exact(&mut fixed).map_err(|e| format!("reading the answer to the link offer failed: {e}"))?;
    let (declined, reason_len) = LinkReply::decode_fixed(&fixed)?;
    let mut reason = vec![0u8; reason_len.min(MAX_LINK_TEXT)];
    stream.read_exact(&mut reason).map_err(|e| format!("reading the answer to the link offer failed: {e}"))?;
    Ok(declined.then(|| String::from_utf8_lossy(&reason).into_owned()))
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

fn set_timeouts(stream: &TcpStream, timeout: Duration) -> Result<(), CommError> {
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| CommError::Local { op: "connect", source: e })
}

/// Errors worth retrying while the right neighbour is still starting (or its name not yet resolvable).
fn is_retryable(e: &io::Error) -> bool {
    !matches!(e.kind(), io::ErrorKind::InvalidInput | io::ErrorKind::PermissionDenied | io::ErrorKind::Unsupported)
}

fn connect_with_retry(addr: &str, peer_rank: usize, deadline: Instant) -> Result<TcpStream, CommError> {
    let mut backoff = Duration::from_millis(5);
    loop {
        let error = match connect_once(addr, remaining(deadline)) {
            Ok(stream) => return Ok(stream),
            Err(e) => e,
        };
        if !is_retryable(&error) || Instant::now() >= deadline {
            return Err(CommError::Peer { op: "connect", peer_rank, peer_addr: addr.to_owned(), source: error });
        }
        std::thread::sleep(backoff.min(remaining(deadline)));
        backoff = (backoff * 2).min(CONNECT_BACKOFF_MAX);
    }
}

fn connect_once(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr} resolved to no address"));
    for socket_addr in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&socket_addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Accepts connections until one carries the left neighbour's valid hello, or the deadline passes.
fn accept_left(
    listener: &TcpListener,
    rank: usize,
    left_rank: usize,
    left_addr: &str,
    generation: u64,
    world_size: usize,
    deadline: Instant,
) -> Result<(TcpStream, Hello), CommError> {
    let local = |e| CommError::Local { op: "connect", source: e };
    listener.set_nonblocking(true).map_err(local)?;
    let expected = Hello::new(generation, left_rank, world_size);
    let reply = Hello::new(generation, rank, world_size).encode();
    let mut last_rejection: Option<String> = None;
    loop {
        match listener.accept() {
            Ok((stream, from)) => match accept_hello(&stream, &expected, &reply, deadline) {
                Ok(hello) => return Ok((stream, hello)),
                Err(reason) => {
                    tracing::warn!(rank, generation, %from, reason = %reason, "rejected a collective connection");
                    last_rejection = Some(format!("{from}: {reason}"));
                }
            },
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => return Err(local(e)),
        }
        if Instant::now() >= deadline {
            let detail = match last_rejection {
                Some(rejected) => {
                    format!("no valid connection before the deadline; last rejected {rejected}")
                }
                None => "no connection before the deadline".to_owned(),
            };
            return Err(CommError::Handshake {
                rank,
                side: "left",
                peer_rank: left_rank,
                peer_addr: left_addr.to_owned(),
                detail,
            });
        }
        std::thread::sleep(ACCEPT_POLL);
    }
}

/// Reads and checks the hello on an accepted connection and answers it; the error is the reason to
/// reject the connection.
fn accept_hello(
    stream: &TcpStream,
    expected: &Hello,
    reply: &[u8; HELLO_LEN],
    deadline: Instant,
) -> Result<Hello, String> {
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(remaining(deadline).min(HELLO_READ_TIMEOUT))))
        .and_then(|()| stream.set_write_timeout(Some(remaining(deadline))))
        .map_err(|e| format!("socket set-up failed: {e}"))?;
    let mut hello = [0u8; HELLO_LEN];
    (&*stream).read_exact(&mut hello).map_err(|e| format!("reading the hello failed: {e}"))?;
    let hello = Hello::decode(&hello)?;
    hello.check(expected)?;
    (&*stream).write_all(reply).map_err(|e| format!("answering the hello failed: {e}"))?;
    Ok(hello)
}

#[cfg(test)]
mod tests;
