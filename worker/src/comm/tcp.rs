//! `TcpRing`: a ring of TCP connections between the ranks of one rendezvous generation, and its
//! collectives over host buffers (all-reduce, all-gather, broadcast, barrier; algorithms in `ring`).
//!
//! Set-up: rank r connects to its right neighbour (r + 1) % W, retrying refused connections until the
//! deadline, sends a `Hello` and then accepts its left neighbour's connection on its own listener.
//! A connection whose hello is wrong (magic, version, generation, world size, sender rank) is logged,
//! closed and ignored, and the accept keeps waiting until the deadline: a stray probe or a straggler
//! of an older generation cannot take the place of the real neighbour. The accepting side answers a
//! good hello with its own, which the connecting side checks last. Connecting before accepting cannot
//! deadlock: every listener is bound before `connect` is called, so connections complete in the
//! kernel's backlog.
//!
//! Messages: a `FrameHeader` (op, element type, step, collective sequence number, length), then the
//! payload. Each step of all-reduce and all-gather writes to the right on a scoped thread while the
//! calling thread reads from the left, so large buffers cannot deadlock on full socket buffers.
//!
//! Failure: sockets carry read and write timeouts equal to the ring's timeout, so a dead or absent
//! peer turns into an error naming it. On the first error the ring shuts its sockets down (the
//! neighbours then fail fast instead of waiting for their own timeouts) and stays poisoned.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::error::CommError;
use super::frame::{HELLO_LEN, Hello, OpCode};
use super::link::{Link, Links};
use super::ring::{ring_all_gather, ring_all_reduce, ring_broadcast};

/// An element type the ring can sum. `WIRE_CODE` travels in every frame header so that ranks
/// summing different types fail with a protocol error instead of adding garbage.
pub trait Element: bytemuck::Pod + Copy + Send + Sync + 'static {
    /// Name for messages and logs.
    const DTYPE: &'static str;
    /// Stable code on the wire (1 f32, 2 f64; 3 bf16 and 4 f16 reserved). 0 means raw bytes.
    const WIRE_CODE: u8;
    fn add(a: Self, b: Self) -> Self;
}

impl Element for f32 {
    const DTYPE: &'static str = "f32";
    const WIRE_CODE: u8 = 1;
    fn add(a: Self, b: Self) -> Self {
        a + b
    }
}

impl Element for f64 {
    const DTYPE: &'static str = "f64";
    const WIRE_CODE: u8 = 2;
    fn add(a: Self, b: Self) -> Self {
        a + b
    }
}

const ACCEPT_POLL: Duration = Duration::from_millis(2);
/// How long an accepted connection may take to send its hello. A real neighbour sends it right after
/// connecting; the cap stops a silent stray connection from holding the accept until the deadline.
const HELLO_READ_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// A ring of TCP connections between the ranks of one generation; see the module doc.
///
/// All ranks must call the collectives in the same order with matching arguments. Every call blocks
/// until this rank's part is done; a peer silent for longer than the timeout makes it fail.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world_size: usize,
    generation: u64,
    timeout: Duration,
    /// `None` for a world of one.
    links: Option<Links>,
    /// Number of collectives started; travels in every frame header.
    seq: u64,
    /// Set by the first failed collective: the message of that error.
    poisoned: Option<String>,
}

impl TcpRing {
    /// Forms the ring: see the module doc. `peers[i]` is the collective address (`host:port`) of rank
    /// `i`; `listener` is this rank's own, already bound. Fails if the ring is not formed within
    /// `timeout`, which also becomes the read and write timeout of the sockets.
    pub fn connect(
        listener: TcpListener,
        rank: usize,
        peers: &[String],
        generation: u64,
        timeout: Duration,
    ) -> Result<TcpRing, CommError> {
        const OP: &str = "connect";
        let world_size = peers.len();
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
        let mut ring = TcpRing { rank, world_size, generation, timeout, links: None, seq: 0, poisoned: None };
        if world_size == 1 {
            return Ok(ring);
        }

        let deadline = Instant::now() + timeout;
        let right_rank = (rank + 1) % world_size;
        let left_rank = (rank + world_size - 1) % world_size;

        let right = Link {
            stream: connect_with_retry(&peers[right_rank], right_rank, deadline)?,
            peer_rank: right_rank,
            peer_addr: peers[right_rank].clone(),
            timeout,
        };
        set_timeouts(&right, remaining(deadline))?;
        right.write_raw(OP, &Hello::new(generation, rank, world_size).encode())?;

        let left = Link {
            stream: accept_left(&listener, rank, left_rank, &peers[left_rank], generation, world_size, deadline)?,
            peer_rank: left_rank,
            peer_addr: peers[left_rank].clone(),
            timeout,
        };

        // The right neighbour answers once it has accepted us; an early close means it rejected us.
        set_timeouts(&right, remaining(deadline))?;
        let mut reply = [0u8; HELLO_LEN];
        let handshake_error = |detail: String| CommError::Handshake {
            rank,
            side: "right",
            peer_rank: right_rank,
            peer_addr: peers[right_rank].clone(),
            detail,
        };
        (&right.stream).read_exact(&mut reply).map_err(|e| {
            handshake_error(match e.kind() {
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                    "peer closed the connection instead of answering (it rejected this rank's hello, e.g. another generation or world size, or it exited)".to_owned()
                }
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "no answer before the deadline".to_owned(),
                _ => format!("reading the answer failed: {e}"),
            })
        })?;
        Hello::decode(&reply)
            .and_then(|h| h.check(&Hello::new(generation, right_rank, world_size)))
            .map_err(handshake_error)?;

        for link in [&right, &left] {
            link.stream.set_nodelay(true).map_err(|e| CommError::Local { op: OP, source: e })?;
            set_timeouts(link, timeout)?;
        }
        tracing::debug!(rank, generation, world_size, left = left_rank, right = right_rank, "tcp ring connected");
        ring.links = Some(Links { right, left });
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

    /// Whether an earlier collective failed (the ring is then unusable).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// In-place sum over ranks: ring reduce-scatter, then ring all-gather. Every rank ends with
    /// bit-identical values (each chunk's sum is computed on one rank and copied to the others).
    pub fn all_reduce_sum<T: Element>(&mut self, buf: &mut [T]) -> Result<(), CommError> {
        self.all_reduce_sum_as("all_reduce_sum", buf)
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
        const OP: &str = "barrier";
        let (rank, world) = (self.rank, self.world_size);
        self.run(OP, |links, seq| ring_all_gather(links, OP, OpCode::Barrier, rank, world, seq, &[])).map(|_| ())
    }

    pub(crate) fn all_reduce_sum_as<T: Element>(&mut self, op: &'static str, buf: &mut [T]) -> Result<(), CommError> {
        let (rank, world) = (self.rank, self.world_size);
        self.run(op, |links, seq| ring_all_reduce(links, op, rank, world, seq, buf))
    }

    pub(crate) fn all_gather_bytes_as(&mut self, op: &'static str, local: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        let (rank, world) = (self.rank, self.world_size);
        if world == 1 {
            self.check_usable(op)?;
            return Ok(vec![local.to_vec()]);
        }
        self.run(op, |links, seq| ring_all_gather(links, op, OpCode::AllGather, rank, world, seq, local))
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
        self.run(op, |links, seq| ring_broadcast(links, op, rank, seq, root, buf))
    }

    fn check_usable(&self, op: &'static str) -> Result<(), CommError> {
        match &self.poisoned {
            Some(cause) => Err(CommError::Poisoned { op, cause: cause.clone() }),
            None => Ok(()),
        }
    }

    /// Runs one collective over the links (a no-op returning `R::default()` for a world of one), and
    /// poisons the ring if it fails.
    fn run<R: Default>(
        &mut self,
        op: &'static str,
        collective: impl FnOnce(&Links, u64) -> Result<R, CommError>,
    ) -> Result<R, CommError> {
        self.check_usable(op)?;
        let Some(links) = &self.links else {
            return Ok(R::default());
        };
        self.seq += 1;
        let result = collective(links, self.seq);
        if let Err(e) = &result {
            links.shutdown();
            self.poisoned = Some(e.to_string());
        }
        result
    }
}

impl Drop for TcpRing {
    fn drop(&mut self) {
        if let Some(links) = &self.links {
            links.shutdown();
        }
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

fn set_timeouts(link: &Link, timeout: Duration) -> Result<(), CommError> {
    link.stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| link.stream.set_write_timeout(Some(timeout)))
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
) -> Result<TcpStream, CommError> {
    let local = |e| CommError::Local { op: "connect", source: e };
    listener.set_nonblocking(true).map_err(local)?;
    let expected = Hello::new(generation, left_rank, world_size);
    let reply = Hello::new(generation, rank, world_size).encode();
    let mut last_rejection: Option<String> = None;
    loop {
        match listener.accept() {
            Ok((stream, from)) => match accept_hello(&stream, &expected, &reply, deadline) {
                Ok(()) => return Ok(stream),
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
) -> Result<(), String> {
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(remaining(deadline).min(HELLO_READ_TIMEOUT))))
        .and_then(|()| stream.set_write_timeout(Some(remaining(deadline))))
        .map_err(|e| format!("socket set-up failed: {e}"))?;
    let mut hello = [0u8; HELLO_LEN];
    (&*stream).read_exact(&mut hello).map_err(|e| format!("reading the hello failed: {e}"))?;
    Hello::decode(&hello)?.check(expected)?;
    (&*stream).write_all(reply).map_err(|e| format!("answering the hello failed: {e}"))
}

#[cfg(test)]
mod tests;
