//! The progress engine: runs one collective's messages over a rank's `Links` on the calling thread.
//!
//! A collective is a `Plan`: the messages this rank sends to the right (in order) and receives from
//! the left (in order). An outgoing message is either local data or forwards the result of an incoming
//! one, so its segments can leave as soon as the matching bytes have been received and reduced: ring
//! steps overlap segment by segment (a pipelined ring). The engine alternates between the two sides
//! without ever blocking on one: it receives (and reduces or copies) at most about one segment, then
//! sends at most one segment, and only waits when neither side can move. So a full socket buffer or
//! shared ring on one side can never deadlock the ring, whatever the message sizes, and no helper
//! thread is needed.
//!
//! Receiving: a tcp payload that is copied is read straight into its destination; one that is reduced
//! is read into a segment-sized scratch buffer and added into the destination as it arrives (the
//! reduction of one read overlaps the transfer of the next). A shared-memory segment is reduced or
//! copied straight out of the shared slot.
//!
//! Waiting: with a shared-memory side involved, spin briefly (10 us), then sleep
//! on the ring's futex (woken by the neighbour's next publish, or after 1 ms); with tcp only, sleep in
//! `poll` until a socket is ready; with both, sleep in `poll` with a growing timeout (20 us to 1 ms).
//! Every wait polls the connections for abort notices and closed peers, checks the abort flag, the
//! neighbours' processes (every 100 ms) and the timeout: no progress for `timeout` is an error naming
//! the peer waited on (the left one if this rank still expects data, else the right one).

use std::io::{self, Read};
use std::ops::Range;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

use super::error::CommError;
use super::frame::{AbortNotice, Expected, OpCode, RecordHeader};
use super::link::{AbortState, Incoming, Links, Peer, Rx, Tx};

/// Upper bound on a variable-length message announced by a peer (guards the allocation).
const MAX_PAYLOAD: u64 = 1 << 36;
/// How long a wait on a shared ring spins before it sleeps: long enough to catch a neighbour that
/// runs on another core (a small message's hop takes 1-3 us), short enough to hand the core over
/// when the neighbour shares this one (an oversubscribed host), where spinning only delays it.
const SPIN_TIME: Duration = Duration::from_micros(10);
/// Longest sleep on a ring's futex: the wait then looks at the sockets, the abort flag and the clock.
const FUTEX_SLEEP: Duration = Duration::from_millis(1);
const FIRST_SLEEP: Duration = Duration::from_micros(20);
const LONGEST_SLEEP: Duration = Duration::from_millis(1);
const LIVENESS_PERIOD: Duration = Duration::from_millis(100);

/// Where an outgoing message's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// This rank's own data, all available at once.
    Local,
    /// The result of incoming message `j`, available as far as it has been received.
    Forward(usize),
}

/// The length of an incoming message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Expect {
    Fixed(usize),
    /// Announced by its first record.
    Variable,
}

/// One collective as seen by one rank. Message `i` travels with step `i` in its records.
pub(super) trait Plan {
    /// Op, element type and reduction code carried by every record.
    fn kind(&self) -> (OpCode, u8, u8);
    /// Records and reductions are cut at multiples of this size.
    fn elem_size(&self) -> usize;
    fn tx_count(&self) -> usize;
    fn tx_source(&self, i: usize) -> Source;
    /// Length of a `Local` outgoing message.
    fn tx_len(&self, i: usize) -> usize;
    fn tx_bytes(&self, i: usize, range: Range<usize>) -> &[u8];
    fn rx_count(&self) -> usize;
    fn rx_expect(&self, i: usize) -> Expect;
    /// Prepares the destination of incoming message `i`, once its length is known.
    fn rx_begin(&mut self, _i: usize, _len: usize) {}
    /// Whether incoming message `i` is copied into `rx_dst` (rather than reduced with `rx_reduce`).
    fn rx_copies(&self, i: usize) -> bool;
    fn rx_dst(&mut self, i: usize, range: Range<usize>) -> &mut [u8];
    /// Combines `incoming`, the bytes at `offset` of message `i` (element-aligned), into the destination.
    fn rx_reduce(&mut self, i: usize, offset: usize, incoming: &[u8]);
}

pub(super) struct Context<'a> {
    pub op: &'static str,
    pub seq: u64,
    pub timeout: Duration,
    /// Segment size of tcp records (shared-memory slots have their own).
    pub segment: usize,
    pub abort: &'a AbortState,
}

struct State {
    rx_len: Vec<Option<usize>>,
    rx_done: Vec<usize>,
    rx_i: usize,
    /// Payload bytes of the current tcp record still in the stream.
    record_left: usize,
    /// Bytes at the start of the scratch buffer received but not yet reduced (less than one element).
    fill: usize,
    tx_i: usize,
    tx_off: usize,
    left_closed: bool,
    right_closed: bool,
    last_progress: Instant,
    last_liveness: Instant,
    /// When the current wait (rounds without progress) began.
    waiting_since: Option<Instant>,
    /// Sleeps in the current wait.
    naps: u32,
}

/// Runs `plan` to completion on this rank. On error the caller poisons the ring and tells the
/// neighbours; an error that follows an abort is reported as `Aborted`.
pub(super) fn run<P: Plan>(links: &mut Links, plan: &mut P, ctx: &Context<'_>) -> Result<(), CommError> {
    let result = run_inner(links, plan, ctx);
    match result {
        Err(_) if ctx.abort.is_set() => Err(aborted(ctx)),
        r => r,
    }
}

fn aborted(ctx: &Context<'_>) -> CommError {
    CommError::Aborted { op: ctx.op, reason: ctx.abort.reason().unwrap_or_default() }
}

fn reported(op: &'static str, n: AbortNotice) -> CommError {
    CommError::Reported { op, reporter: n.origin, failed_rank: n.failed, reason: n.reason }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed")
}

fn run_inner<P: Plan>(links: &mut Links, plan: &mut P, ctx: &Context<'_>) -> Result<(), CommError> {
    let (n_tx, n_rx) = (plan.tx_count(), plan.rx_count());
    let now = Instant::now();
    let mut s = State {
        rx_len: vec![None; n_rx],
        rx_done: vec![0; n_rx],
        rx_i: 0,
        record_left: 0,
        fill: 0,
        tx_i: 0,
        tx_off: 0,
        left_closed: false,
        right_closed: false,
        last_progress: now,
        last_liveness: now,
        waiting_since: None,
        naps: 0,
    };
    loop {
        if ctx.abort.is_set() {
            return Err(aborted(ctx));
        }
        let mut progress = false;
        if s.rx_i < n_rx {
            progress |= match links.rx {
                Rx::Tcp => rx_tcp(links, plan, &mut s, ctx)?,
                Rx::Shm(_) => rx_shm(links, plan, &mut s, ctx)?,
            };
        }
        let mut tx_blocked = false;
        if s.tx_i < n_tx {
            let (sent, blocked) = tx_step(links, plan, &mut s, ctx)?;
            progress |= sent;
            tx_blocked = blocked;
        }
        if s.rx_i == n_rx && s.tx_i == n_tx {
            return Ok(());
        }
        if progress {
            s.waiting_since = None;
            s.naps = 0;
            s.last_progress = Instant::now();
        } else {
            wait(links, &mut s, ctx, n_rx, n_tx, tx_blocked)?;
        }
    }
}

fn expected<P: Plan>(plan: &P, ctx: &Context<'_>, step: usize) -> Expected {
    let (op, dtype, reduce) = plan.kind();
    Expected { op, dtype, reduce, step: step as u32, seq: ctx.seq }
}

/// Checks a data record for the current incoming message and starts the message on its first record.
/// Returns the segment length.
fn accept<P: Plan>(
    plan: &mut P,
    s: &mut State,
    ctx: &Context<'_>,
    left: &Peer,
    header: &RecordHeader,
) -> Result<usize, CommError> {
    let i = s.rx_i;
    let protocol = |detail: String| left.protocol(ctx.op, detail);
    header.check(&expected(plan, ctx, i)).map_err(protocol)?;
    let elem = plan.elem_size();
    let msg_len = header.msg_len;
    match (plan.rx_expect(i), s.rx_len[i]) {
        (Expect::Fixed(n), _) if msg_len != n as u64 => {
            return Err(protocol(format!(
                "step {i}: peer sent {msg_len} bytes, this rank expected {n} (do all ranks pass buffers of the same length?)"
            )));
        }
        (_, Some(n)) if msg_len != n as u64 => {
            return Err(protocol(format!("step {i}: message length changed from {n} to {msg_len} bytes")));
        }
        (Expect::Variable, None) if msg_len > MAX_PAYLOAD => {
            return Err(protocol(format!("announced payload of {msg_len} bytes exceeds the limit {MAX_PAYLOAD}")));
        }
        _ => {}
    }
    let msg_len = usize::try_from(msg_len)
        .map_err(|_| protocol(format!("announced payload of {msg_len} bytes does not fit in memory")))?;
    if !msg_len.is_multiple_of(elem) {
        return Err(protocol(format!("step {i}: {msg_len} bytes is not a whole number of {elem}-byte elements")));
    }
    if s.rx_len[i].is_none() {
        s.rx_len[i] = Some(msg_len);
        plan.rx_begin(i, msg_len);
    }
    let left_in_msg = msg_len - s.rx_done[i];
    let seg = header.seg_len;
    if seg > left_in_msg as u64 || !seg.is_multiple_of(elem as u64) || (seg == 0 && left_in_msg != 0) {
        return Err(protocol(format!("step {i}: record of {seg} bytes with {left_in_msg} bytes of the message left")));
    }
    if msg_len == 0 {
        s.rx_i += 1;
    }
    Ok(seg as usize)
}

fn read_error(left: &Peer, op: &'static str, e: io::Error) -> CommError {
    if e.kind() == io::ErrorKind::InvalidData { left.protocol(op, e.to_string()) } else { left.error(op, e) }
}

/// Receives over tcp: record headers through the left reader, payloads straight from the stream.
/// Returns whether anything was received; stops after about one segment of payload.
fn rx_tcp<P: Plan>(links: &mut Links, plan: &mut P, s: &mut State, ctx: &Context<'_>) -> Result<bool, CommError> {
    let n_rx = plan.rx_count();
    let elem = plan.elem_size();
    let mut budget = ctx.segment;
    let mut progress = false;
    while s.rx_i < n_rx {
        let i = s.rx_i;
        if s.record_left == 0 {
            match links.left_reader.poll(&links.left.stream) {
                Ok(None) => return Ok(progress),
                Ok(Some(Incoming::Abort(n))) => return Err(reported(ctx.op, n)),
                Ok(Some(Incoming::Data(header))) => {
                    s.record_left = accept(plan, s, ctx, &links.left, &header)?;
                    progress = true;
                }
                Err(e) => return Err(read_error(&links.left, ctx.op, e)),
            }
            continue;
        }
        if budget == 0 {
            return Ok(progress);
        }
        let done = s.rx_done[i];
        let read = if plan.rx_copies(i) {
            let want = s.record_left.min(budget);
            (&links.left.stream).read(plan.rx_dst(i, done..done + want))
        } else {
            let scratch: &mut [u8] = bytemuck::cast_slice_mut(&mut links.scratch);
            let want = s.record_left.min(scratch.len() - s.fill);
            (&links.left.stream).read(&mut scratch[s.fill..s.fill + want])
        };
        let n = match read {
            Ok(0) => return Err(links.left.error(ctx.op, closed())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(progress),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(links.left.error(ctx.op, e)),
        };
        progress = true;
        budget = budget.saturating_sub(n);
        s.record_left -= n;
        if plan.rx_copies(i) {
            s.rx_done[i] += n;
        } else {
            let scratch: &mut [u8] = bytemuck::cast_slice_mut(&mut links.scratch);
            s.fill += n;
            let whole = s.fill - s.fill % elem;
            if whole > 0 {
                plan.rx_reduce(i, done, &scratch[..whole]);
                s.rx_done[i] += whole;
                scratch.copy_within(whole..s.fill, 0);
                s.fill -= whole;
            }
        }
        if s.record_left == 0 && Some(s.rx_done[i]) == s.rx_len[i] {
            s.rx_i += 1;
        }
    }
    Ok(progress)
}

/// Receives out of the shared ring: each segment is reduced or copied straight out of its slot.
fn rx_shm<P: Plan>(links: &mut Links, plan: &mut P, s: &mut State, ctx: &Context<'_>) -> Result<bool, CommError> {
    let n_rx = plan.rx_count();
    let Links { rx: Rx::Shm(shm), left, .. } = links else {
        return Ok(false);
    };
    let mut progress = false;
    // Two segments per call: enough to keep the producer's slots turning over.
    for _ in 0..2 {
        if s.rx_i == n_rx {
            break;
        }
        let Some((header, payload)) = shm.peek().map_err(|d| left.protocol(ctx.op, d))? else {
            break;
        };
        let i = s.rx_i;
        let seg = accept(plan, s, ctx, left, &header)?;
        if seg > 0 {
            let done = s.rx_done[i];
            if plan.rx_copies(i) {
                plan.rx_dst(i, done..done + seg).copy_from_slice(payload);
            } else {
                plan.rx_reduce(i, done, payload);
            }
            s.rx_done[i] += seg;
            if Some(s.rx_done[i]) == s.rx_len[i] {
                s.rx_i += 1;
            }
        }
        shm.release();
        progress = true;
    }
    Ok(progress)
}

/// Sends the next segment if its bytes are available and the transport takes it. Returns (sent,
/// blocked by the transport).
fn tx_step<P: Plan>(
    links: &mut Links,
    plan: &mut P,
    s: &mut State,
    ctx: &Context<'_>,
) -> Result<(bool, bool), CommError> {
    let i = s.tx_i;
    let (len, available) = match plan.tx_source(i) {
        Source::Local => (plan.tx_len(i), plan.tx_len(i)),
        Source::Forward(j) => match s.rx_len[j] {
            Some(len) => (len, s.rx_done[j]),
            None => return Ok((false, false)),
        },
    };
    let segment = match &links.tx {
        Tx::Tcp(_) => ctx.segment,
        Tx::Shm(shm) => shm.max_segment(),
    };
    let end = (s.tx_off + segment).min(len);
    if available < end {
        return Ok((false, false));
    }
    let header = RecordHeader::data(expected(plan, ctx, i), len, end - s.tx_off);
    let data = plan.tx_bytes(i, s.tx_off..end);
    let sent = match &mut links.tx {
        Tx::Tcp(tcp) => match tcp.try_send(&links.right.stream, &header, data) {
            Ok(sent) => sent,
            Err(e) => {
                // A neighbour that gave up sends its notice (why, and whom it blames) before closing:
                // the notice, still readable after the reset, is the better error than the write's.
                read_control(&mut links.right_reader, &links.right, ctx.op)?;
                return Err(links.right.error(ctx.op, e));
            }
        },
        Tx::Shm(shm) => shm.try_send(&header, data),
    };
    if !sent {
        return Ok((false, true));
    }
    s.tx_off = end;
    if end == len {
        s.tx_i += 1;
        s.tx_off = 0;
    }
    Ok((true, false))
}

/// Reads an abort notice or end of stream off a connection that carries no data in this direction.
/// Returns whether the peer closed it.
fn read_control(reader: &mut super::link::RecordReader, peer: &Peer, op: &'static str) -> Result<bool, CommError> {
    match reader.poll(&peer.stream) {
        Ok(None) => Ok(false),
        Ok(Some(Incoming::Abort(n))) => Err(reported(op, n)),
        Ok(Some(Incoming::Data(h))) => {
            Err(peer.protocol(op, format!("unexpected data record (step {}) on a connection without data", h.step)))
        }
        Err(e) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => Ok(true),
        Err(e) => Err(read_error(peer, op, e)),
    }
}

fn wait(
    links: &mut Links,
    s: &mut State,
    ctx: &Context<'_>,
    n_rx: usize,
    n_tx: usize,
    tx_blocked: bool,
) -> Result<(), CommError> {
    let rx_waiting = s.rx_i < n_rx;
    let tx_waiting = s.tx_i < n_tx;
    let rx_shm = matches!(links.rx, Rx::Shm(_));
    let tx_shm = matches!(links.tx, Tx::Shm(_));
    // A neighbour seen gone on an earlier round, with nothing received since: it will send no more.
    // If it said why before leaving, that is the error.
    if rx_waiting && s.left_closed {
        if rx_shm {
            read_control(&mut links.left_reader, &links.left, ctx.op)?;
        }
        return Err(links.left.error(ctx.op, closed()));
    }
    if tx_waiting && s.right_closed {
        read_control(&mut links.right_reader, &links.right, ctx.op)?;
        return Err(links.right.error(ctx.op, closed()));
    }
    if let (true, Rx::Shm(shm)) = (rx_waiting, &links.rx)
        && shm.ring().peer_gone()
    {
        s.left_closed = true; // confirmed once the ring has been drained
        return Ok(());
    }
    if let (true, Tx::Shm(shm)) = (tx_waiting, &links.tx)
        && shm.ring().peer_gone()
    {
        s.right_closed = true;
        return Ok(());
    }
    let stalled = s.last_progress.elapsed();
    if stalled >= ctx.timeout {
        let peer = if rx_waiting { &links.left } else { &links.right };
        let source = io::Error::new(io::ErrorKind::TimedOut, format!("no progress within {:?}", ctx.timeout));
        return Err(peer.error(ctx.op, source));
    }
    if s.last_liveness.elapsed() >= LIVENESS_PERIOD {
        s.last_liveness = Instant::now();
        for (waiting, peer) in [(rx_waiting, &links.left), (tx_waiting, &links.right)] {
            if let (true, Some(l)) = (waiting, peer.liveness)
                && !l.alive()
            {
                let source = io::Error::new(io::ErrorKind::ConnectionAborted, format!("process {} exited", l.pid()));
                return Err(peer.error(ctx.op, source));
            }
        }
    }
    let rx_shm_waiting = rx_waiting && rx_shm;
    let tx_shm_blocked = tx_blocked && tx_shm;
    let shm_waiting = rx_shm_waiting || tx_shm_blocked;
    let tcp_waiting = (rx_waiting && !rx_shm) || (tx_blocked && !tx_shm);
    let waiting_since = *s.waiting_since.get_or_insert_with(Instant::now);
    if shm_waiting && waiting_since.elapsed() < SPIN_TIME {
        std::hint::spin_loop();
        return Ok(());
    }
    s.naps = s.naps.saturating_add(1);
    // Shared memory only: look at the sockets without blocking, then sleep on the ring's futex.
    // Shared memory and tcp: sleep in poll, briefly (backing off), and look at the ring again.
    // Tcp only: sleep in poll until a socket is ready (waking for liveness checks).
    let sleep = match (shm_waiting, tcp_waiting) {
        (true, false) => Duration::ZERO,
        (true, true) => {
            let doublings = (s.naps - 1).min(16);
            FIRST_SLEEP.saturating_mul(1 << doublings).min(LONGEST_SLEEP)
        }
        (false, _) => LIVENESS_PERIOD,
    };
    let sleep = sleep.min(ctx.timeout - stalled);
    // Only sockets this rank waits on are polled: a neighbour that finished and closed its end must
    // not wake every round (a reset connection reports HUP and ERR whatever is asked).
    let mut right_flags = PollFlags::IN;
    if tx_blocked && !tx_shm {
        right_flags |= PollFlags::OUT;
    }
    let mut fds = Vec::with_capacity(2);
    if rx_waiting {
        fds.push(PollFd::new(&links.left.stream, PollFlags::IN));
    }
    if tx_waiting {
        fds.push(PollFd::new(&links.right.stream, right_flags));
    }
    let timeout = Timespec { tv_sec: sleep.as_secs() as i64, tv_nsec: sleep.subsec_nanos() as _ };
    match rustix::event::poll(&mut fds, Some(&timeout)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => return Err(CommError::Local { op: ctx.op, source: e.into() }),
    }
    let attention = PollFlags::IN | PollFlags::HUP | PollFlags::ERR;
    let ready: Vec<bool> = fds.iter().map(|fd| !(fd.revents() & attention).is_empty()).collect();
    drop(fds);
    let left_ready = rx_waiting && ready[0];
    let right_ready = tx_waiting && ready[usize::from(rx_waiting)];
    // A tcp data link is read by `rx_tcp` on the next round; a shared-memory one only carries control.
    if rx_waiting && rx_shm && left_ready && read_control(&mut links.left_reader, &links.left, ctx.op)? {
        s.left_closed = true;
    }
    if tx_waiting && right_ready && read_control(&mut links.right_reader, &links.right, ctx.op)? {
        s.right_closed = true;
    }
    if shm_waiting && !tcp_waiting && !left_ready && !right_ready {
        let nap = FUTEX_SLEEP.min(ctx.timeout - stalled);
        match (&links.tx, &links.rx) {
            (Tx::Shm(shm), _) if tx_shm_blocked => shm.sleep_for_space(nap),
            (_, Rx::Shm(shm)) => shm.sleep_for_data(nap),
            _ => {}
        }
    }
    Ok(())
}
