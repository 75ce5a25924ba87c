//! `Links`: one rank's two ring neighbours. Every neighbour has a tcp connection (handshake, failure
//! notices, liveness, and the data itself unless the link is shared memory); data to the right goes
//! through a `Tx`, data from the left comes through an `Rx`, each over tcp or shared memory.
//!
//! Directions: the connection to the right carries this rank's data records (tcp links) or nothing
//! (shared-memory links) forwards, and only abort notices backwards; the same holds, mirrored, for the
//! connection to the left. So an abort notice can always be written backwards, and forwards whenever
//! the data stream is between records.
//!
//! Also here: `RecordReader` (reads records off a non-blocking tcp stream without reading past them),
//! `AbortState` (what an `AbortHandle` sets and wakes), and `Liveness` (whether a neighbour process on
//! the same host still runs, from /proc).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use super::error::CommError;
use super::frame::{AbortNotice, MAX_REASON, RECORD_ABORT, RECORD_DATA, RECORD_LEN, RecordHeader};
use super::options::Transport;
use super::shm::{ShmRx, ShmTx};

/// Payloads up to this size are written in one call together with their header.
const SMALL_RECORD: usize = 4096;

/// One neighbour: its connection, who it is (for errors), and how to tell whether its process runs.
#[derive(Debug)]
pub(super) struct Peer {
    pub stream: TcpStream,
    pub rank: usize,
    pub addr: String,
    pub liveness: Option<Liveness>,
}

impl Peer {
    pub fn error(&self, op: &'static str, source: io::Error) -> CommError {
        CommError::Peer { op, peer_rank: self.rank, peer_addr: self.addr.clone(), source }
    }

    pub fn protocol(&self, op: &'static str, detail: String) -> CommError {
        CommError::Protocol { op, peer_rank: self.rank, detail }
    }
}

/// Writes records on a non-blocking tcp stream, resuming a record that did not fit at once.
#[derive(Debug, Default)]
pub(super) struct TcpTx {
    /// Bytes of the current record (header, then data) already written.
    written: usize,
    /// Length of the current record (header + data) while one is half written.
    total: usize,
    small: Vec<u8>,
}

impl TcpTx {
    /// Writes what fits of the record; `Ok(true)` once all of it is written. The caller passes the
    /// same record again until then.
    pub fn try_send(&mut self, mut stream: &TcpStream, header: &RecordHeader, data: &[u8]) -> io::Result<bool> {
        let total = RECORD_LEN + data.len();
        self.total = total;
        while self.written < total {
            let result = if data.len() <= SMALL_RECORD {
                if self.written == 0 {
                    self.small.clear();
                    self.small.extend_from_slice(&header.encode());
                    self.small.extend_from_slice(data);
                }
                stream.write(&self.small[self.written..])
            } else if self.written < RECORD_LEN {
                stream.write(&header.encode()[self.written..])
            } else {
                stream.write(&data[self.written - RECORD_LEN..])
            };
            match result {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "connection accepts no more data")),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.written = 0;
        Ok(true)
    }

    /// Completes a half-written record with zero bytes (best effort), so that an abort notice can
    /// follow on the stream. The receiver takes the padding as data of a collective that is failing
    /// anyway, then reads the notice.
    pub fn pad_to_boundary(&mut self, stream: &TcpStream) -> bool {
        if self.written == 0 {
            return true;
        }
        let padding = vec![0u8; self.total.saturating_sub(self.written)];
        let ok = send_best_effort(stream, &padding);
        self.written = 0;
        ok
    }
}

/// The data path to the right neighbour.
#[derive(Debug)]
pub(super) enum Tx {
    Tcp(TcpTx),
    Shm(ShmTx),
}

/// The data path from the left neighbour. Tcp data is read through `Links::left_reader` (headers)
/// and straight from the stream (payloads).
#[derive(Debug)]
pub(super) enum Rx {
    Tcp,
    Shm(ShmRx),
}

/// A record read off a stream: a data header (its payload still in the stream) or a whole abort notice.
#[derive(Debug)]
pub(super) enum Incoming {
    Data(RecordHeader),
    Abort(AbortNotice),
}

/// Reads records off a non-blocking stream without reading past the end of a header (data records) or
/// of the notice (abort records).
#[derive(Debug, Default)]
pub(super) struct RecordReader {
    buf: Vec<u8>,
}

impl RecordReader {
    /// Reads what is available towards the next record: `Ok(None)` until a data header or a whole abort
    /// record is in. End of stream is `UnexpectedEof`; a malformed record is `InvalidData`.
    pub fn poll(&mut self, mut stream: &TcpStream) -> io::Result<Option<Incoming>> {
        loop {
            let want = if self.buf.len() < RECORD_LEN {
                RECORD_LEN
            } else {
                let header = self.header();
                match header.kind {
                    RECORD_DATA => {
                        self.buf.clear();
                        return Ok(Some(Incoming::Data(header)));
                    }
                    RECORD_ABORT if header.seg_len <= (MAX_REASON + 16) as u64 => {
                        let want = RECORD_LEN + header.seg_len as usize;
                        if self.buf.len() == want {
                            let notice = AbortNotice::decode(&self.buf[RECORD_LEN..]);
                            self.buf.clear();
                            return notice
                                .map(|n| Some(Incoming::Abort(n)))
                                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
                        }
                        want
                    }
                    kind => {
                        self.buf.clear();
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("malformed record (kind {kind}, {} bytes)", header.seg_len),
                        ));
                    }
                }
            };
            let have = self.buf.len();
            self.buf.resize(want, 0);
            match stream.read(&mut self.buf[have..]) {
                Ok(0) => {
                    self.buf.truncate(have);
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
                }
                Ok(n) => self.buf.truncate(have + n),
                Err(e) => {
                    self.buf.truncate(have);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => return Ok(None),
                        io::ErrorKind::Interrupted => {}
                        _ => return Err(e),
                    }
                }
            }
        }
    }

    fn header(&self) -> RecordHeader {
        let mut b = [0u8; RECORD_LEN];
        b.copy_from_slice(&self.buf[..RECORD_LEN]);
        RecordHeader::decode(&b)
    }
}

/// Both neighbours of a rank in a ring of at least two.
#[derive(Debug)]
pub(super) struct Links {
    pub right: Peer,
    pub left: Peer,
    pub tx: Tx,
    pub rx: Rx,
    /// Abort notices coming back from the right.
    pub right_reader: RecordReader,
    /// Records from the left: data headers (tcp data link) and abort notices.
    pub left_reader: RecordReader,
    /// Where tcp payloads that are reduced (not copied) land before they are added in; u64 for alignment.
    pub scratch: Vec<u64>,
}

impl Links {
    /// (to the left, to the right).
    pub fn transports(&self) -> (Transport, Transport) {
        let left = match self.rx {
            Rx::Tcp => Transport::Tcp,
            Rx::Shm(_) => Transport::Shm,
        };
        let right = match self.tx {
            Tx::Tcp(_) => Transport::Tcp,
            Tx::Shm(_) => Transport::Shm,
        };
        (left, right)
    }

    /// Best effort: tells both neighbours why this rank gives up (forwards on the right only where the
    /// data stream is between records), marks the shared rings gone and shuts both connections down.
    pub fn fail(&mut self, notice: &AbortNotice) {
        let record = notice.encode_record();
        send_best_effort(&self.left.stream, &record);
        let forward_ok = match &mut self.tx {
            Tx::Tcp(tcp) => tcp.pad_to_boundary(&self.right.stream),
            Tx::Shm(_) => true,
        };
        if forward_ok {
            send_best_effort(&self.right.stream, &record);
        }
        self.shutdown();
    }

    /// Wakes any blocked i/o on either connection and tells the neighbours that this rank is gone.
    pub fn shutdown(&self) {
        if let Tx::Shm(shm) = &self.tx {
            shm.ring().mark_gone();
        }
        if let Rx::Shm(shm) = &self.rx {
            shm.ring().mark_gone();
        }
        let _ = self.right.stream.shutdown(Shutdown::Both);
        let _ = self.left.stream.shutdown(Shutdown::Both);
    }
}

/// Writes a short record if the stream takes it without blocking (the sockets are non-blocking).
/// How long a failing rank keeps trying to get its abort notice onto a full (non-blocking) stream: the
/// neighbour is normally inside the same collective and draining it.
const NOTICE_PATIENCE: std::time::Duration = std::time::Duration::from_millis(300);

/// Writes all of `bytes` unless the stream fails or stays full for [`NOTICE_PATIENCE`]; whether it did.
fn send_best_effort(mut stream: &TcpStream, bytes: &[u8]) -> bool {
    let deadline = std::time::Instant::now() + NOTICE_PATIENCE;
    let mut written = 0;
    while written < bytes.len() {
        match stream.write(&bytes[written..]) {
            Ok(0) => return false,
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            Err(_) => return false,
        }
    }
    true
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What an `AbortHandle` sets: the flag every collective checks, the first reason, and the means to
/// wake a blocked collective or, when none runs, to tell the neighbours directly.
#[derive(Debug, Default)]
pub(super) struct AbortState {
    flag: AtomicBool,
    reason: Mutex<Option<String>>,
    /// Held by the calling thread while a collective runs.
    pub gate: Mutex<()>,
    wake: Mutex<Option<Wake>>,
}

#[derive(Debug)]
struct Wake {
    rank: usize,
    left: TcpStream,
    right: TcpStream,
    /// Set once the handle has told the neighbours itself.
    closed: bool,
}

impl AbortState {
    /// Gives the handle clones of both connections (a world of one has none).
    pub fn arm(&self, rank: usize, left: &TcpStream, right: &TcpStream) -> io::Result<()> {
        *lock(&self.wake) = Some(Wake { rank, left: left.try_clone()?, right: right.try_clone()?, closed: false });
        Ok(())
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> Option<String> {
        if !self.is_set() {
            return None;
        }
        lock(&self.reason).clone()
    }

    /// Whether a collective holds the gate (for tests that abort one while it runs).
    #[cfg(test)]
    pub fn is_running(&self) -> bool {
        matches!(self.gate.try_lock(), Err(std::sync::TryLockError::WouldBlock))
    }

    /// The ring has failed or is dropped: the handle must not write on its connections any more.
    /// Also closes the handle's clones of the connections.
    pub fn mark_closed(&self) {
        *lock(&self.wake) = None;
    }

    /// See `AbortHandle`. While a collective runs, shutting down the reading side of both connections
    /// wakes its wait at once, and the collective itself then tells the neighbours; otherwise the
    /// handle tells them and closes the connections here.
    pub fn abort(&self, reason: &str) {
        lock(&self.reason).get_or_insert_with(|| reason.to_owned());
        self.flag.store(true, Ordering::Release);
        let mut wake = lock(&self.wake);
        let Some(w) = wake.as_mut() else {
            return;
        };
        if w.closed {
            return;
        }
        let idle = match self.gate.try_lock() {
            Ok(_) | Err(std::sync::TryLockError::Poisoned(_)) => true,
            Err(std::sync::TryLockError::WouldBlock) => false,
        };
        if idle {
            let record = AbortNotice {
                origin: w.rank,
                failed: None,
                reason: format!("aborted: {}", lock(&self.reason).as_deref().unwrap_or(reason)),
            }
            .encode_record();
            send_best_effort(&w.left, &record);
            send_best_effort(&w.right, &record);
            let _ = w.left.shutdown(Shutdown::Both);
            let _ = w.right.shutdown(Shutdown::Both);
            w.closed = true;
        } else {
            let _ = w.left.shutdown(Shutdown::Read);
            let _ = w.right.shutdown(Shutdown::Read);
        }
    }
}

/// A neighbour process on this host, identified by pid and start time (so a reused pid is not taken
/// for the neighbour).
#[derive(Debug, Clone, Copy)]
pub(super) struct Liveness {
    pid: u32,
    start_time: u64,
}

impl Liveness {
    /// `Some` only when the process is visible here (same host and pid namespace) as the one that
    /// sent the hello.
    pub fn watch(pid: u32, start_time: u64) -> Option<Liveness> {
        (start_time != 0 && proc_start_time(pid) == Some(start_time)).then_some(Liveness { pid, start_time })
    }

    pub fn alive(&self) -> bool {
        proc_start_time(self.pid) == Some(self.start_time)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat), if it exists.
fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything: fields after it count
    // from field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// This process's start time for the hello (0 where /proc is unavailable: no liveness watch).
pub(crate) fn own_start_time() -> u64 {
    static START: OnceLock<u64> = OnceLock::new();
    *START.get_or_init(|| proc_start_time(std::process::id()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_wrong_start_time_is_not_watched() {
        let start = own_start_time();
        assert!(start > 0, "no /proc start time");
        let me = Liveness::watch(std::process::id(), start).expect("this process is visible");
        assert!(me.alive());
        assert!(Liveness::watch(std::process::id(), start + 1).is_none());
        assert!(Liveness::watch(u32::MAX - 1, start).is_none());
    }

    #[test]
    fn a_process_that_exits_is_no_longer_alive() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("spawn sleep");
        let start = proc_start_time(child.id()).expect("child visible in /proc");
        let watch = Liveness::watch(child.id(), start).expect("watchable");
        assert!(watch.alive());
        child.kill().expect("kill");
        child.wait().expect("reap");
        assert!(!watch.alive());
    }
}
