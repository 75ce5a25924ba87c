//! Shared-memory data links between ranks on one host: a single-producer single-consumer ring of
//! segments in a file of a tmpfs (by default /dev/shm), mapped by both ranks.
//!
//! The producer (the rank that sends on the link) creates the file, named after its pid, a process-wide
//! counter, the generation and both ranks so that runs and tests never collide; it offers the path to
//! the consumer over the link's tcp connection, and unlinks the file as soon as the consumer has mapped
//! it (or on drop, if the set-up failed): nothing is left behind, even after a crash of either rank
//! once the link is up. The space is reserved up front (`fallocate`), so a full tmpfs is an error at
//! set-up, never a SIGBUS later.
//!
//! Layout: a 512-byte header (magic, version, generation, ranks, slot count and size; the `head` and
//! `tail` counters, two futex words, two "sleeping" flags and two "gone" flags, on separate cache
//! lines), then `slots` slots of a 64-byte record header plus `slot_bytes` of data. The producer writes
//! slot `head % slots` and then publishes it by storing `head + 1` (release); the consumer reads slots
//! below `head` (acquire) and frees them by storing `tail + 1` (release). Each side caches the other's
//! counter and re-reads it only when the ring looks full or empty, so a streaming link touches a shared
//! cache line once per segment.
//!
//! Sleeping: a side that has spun long enough without progress sets its "sleeping" flag and waits on
//! a futex word (`data_seq` for the consumer, `space_seq` for the producer) with a short timeout; the
//! other side bumps that word after every publish (release) and wakes the futex only if the flag is
//! set, so a busy link makes no system call. (Flag store, word load / word increment, flag load are all
//! sequentially consistent: either the sleeper sees the new word value and does not sleep, or the waker
//! sees the flag and wakes it.) Each side sets its "gone" flag and wakes both words when it tears down,
//! so a waiting neighbour notices at once.
//!
//! Trust: both ends are ranks of the same job. A peer that broke the protocol could make the values we
//! read change under us, but every length and counter read from the file is checked before use.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use rustix::event::Timespec;
use rustix::thread::futex;

use super::frame::{RECORD_LEN, RecordHeader};

const MAGIC: u64 = u64::from_le_bytes(*b"HCMOSHM1");
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 512;
const HEAD_AT: usize = 128;
/// Futex word bumped by the producer after each publish (on the head's line: read with it).
const DATA_SEQ_AT: usize = HEAD_AT + 8;
const CONSUMER_SLEEPING_AT: usize = 192;
const TAIL_AT: usize = 256;
/// Futex word bumped by the consumer after each release.
const SPACE_SEQ_AT: usize = TAIL_AT + 8;
const PRODUCER_SLEEPING_AT: usize = 320;
const PRODUCER_GONE_AT: usize = 384;
const CONSUMER_GONE_AT: usize = 448;
const SLOT_HEADER: usize = 64;
/// Slots per ring: enough for the producer to run a few segments ahead of the consumer.
pub(super) const SLOTS: usize = 8;

static NEXT_RING: AtomicU64 = AtomicU64::new(0);

/// A shared mapping of the whole file; unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory shared between processes, not tied to the thread that made it;
// all concurrent access to it goes through the atomics and the slot protocol of `ShmTx` / `ShmRx`.
unsafe impl Send for Mapping {}

impl Mapping {
    fn map(file: &File, len: usize) -> io::Result<Mapping> {
        use rustix::mm::{MapFlags, ProtFlags};
        // SAFETY: a fresh shared mapping chosen by the kernel (null hint), of a file at least `len`
        // bytes long (checked by both callers); no Rust reference to this memory exists yet.
        let ptr = unsafe {
            rustix::mm::mmap(std::ptr::null_mut(), len, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED, file, 0)
        }?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= HEADER_BYTES);
        // SAFETY: in bounds of the header (asserted), 8-aligned (the mapping is page-aligned), and
        // only ever accessed atomically by both processes.
        unsafe { &*self.ptr.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= HEADER_BYTES);
        // SAFETY: as `u64_at`.
        unsafe { &*self.ptr.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    /// Bytes `range` of the mapping, for the side that owns them under the slot protocol.
    fn bytes(&self, start: usize, len: usize) -> &[u8] {
        assert!(start.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: in bounds (asserted); the slot protocol gives the caller this range while it holds
        // the returned borrow (the other side neither writes it until it is released).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), len) }
    }

    fn bytes_mut(&mut self, start: usize, len: usize) -> &mut [u8] {
        assert!(start.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: in bounds (asserted); `&mut self` makes this the only borrow in this process, and
        // the slot protocol keeps the other side off this range until it is published.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(start), len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len == 0 {
            return; // the placeholder of a ring whose mapping failed: nothing mapped
        }
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and every borrow of the memory is tied
        // to `&self`, so none outlives this.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Sizes of a ring.
fn file_len(slot_bytes: usize) -> usize {
    HEADER_BYTES + SLOTS * (SLOT_HEADER + slot_bytes)
}

/// One mapped ring file (either end).
pub(super) struct ShmRing {
    map: Mapping,
    slot_bytes: usize,
    /// The file, until it is unlinked.
    path: Option<PathBuf>,
    /// Which "gone" flag this end sets on drop.
    gone_at: usize,
    /// Which one the other end sets.
    peer_gone_at: usize,
}

impl std::fmt::Debug for ShmRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmRing").field("len", &self.map.len).field("slot_bytes", &self.slot_bytes).finish()
    }
}

impl ShmRing {
    /// Creates, reserves and maps a new ring file in `dir` for data from rank `from` to rank `to`.
    /// `slot_bytes` must be a positive multiple of 64.
    pub fn create(dir: &Path, generation: u64, from: usize, to: usize, slot_bytes: usize) -> io::Result<ShmRing> {
        assert!(slot_bytes > 0 && slot_bytes.is_multiple_of(64));
        let name = format!(
            "hcmoco-{}-{}-g{generation}-r{from}-r{to}",
            std::process::id(),
            NEXT_RING.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path)?;
        let len = file_len(slot_bytes);
        let mut ring = ShmRing {
            // Unlinks the file if anything below fails.
            map: Mapping { ptr: NonNull::dangling(), len: 0 },
            slot_bytes,
            path: Some(path),
            gone_at: PRODUCER_GONE_AT,
            peer_gone_at: CONSUMER_GONE_AT,
        };
        rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, len as u64)?;
        ring.map = Mapping::map(&file, len)?;
        let header = ring.map.bytes_mut(0, 64);
        header[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[16..24].copy_from_slice(&generation.to_le_bytes());
        header[24..32].copy_from_slice(&(from as u64).to_le_bytes());
        header[32..40].copy_from_slice(&(to as u64).to_le_bytes());
        header[40..48].copy_from_slice(&(SLOTS as u64).to_le_bytes());
        header[48..56].copy_from_slice(&(slot_bytes as u64).to_le_bytes());
        Ok(ring)
    }

    /// Maps the ring a producer offered; checks that it is the ring of this link.
    pub fn open(path: &Path, len: u64, generation: u64, from: usize, to: usize) -> Result<ShmRing, String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let actual = file.metadata().map_err(|e| format!("cannot stat {}: {e}", path.display()))?.len();
        if actual != len || len < HEADER_BYTES as u64 {
            return Err(format!("{} is {actual} bytes, the offer said {len}", path.display()));
        }
        let map = Mapping::map(&file, len as usize).map_err(|e| format!("cannot map {}: {e}", path.display()))?;
        let h = map.bytes(0, 64);
        let word = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap_or_default());
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
        let (slots, slot_bytes) = (word(40), word(48));
        if word(0) != MAGIC || version != VERSION {
            return Err(format!("{} is not a version {VERSION} hcmoco ring", path.display()));
        }
        if (word(16), word(24), word(32)) != (generation, from as u64, to as u64) {
            return Err(format!(
                "{} belongs to generation {} from rank {} to rank {}, expected generation {generation} from rank {from} to rank {to}",
                path.display(),
                word(16),
                word(24),
                word(32)
            ));
        }
        if slots != SLOTS as u64
            || slot_bytes == 0
            || !slot_bytes.is_multiple_of(64)
            || file_len(slot_bytes as usize) as u64 != len
        {
            return Err(format!("{} has {slots} slots of {slot_bytes} bytes in {len} bytes", path.display()));
        }
        Ok(ShmRing {
            map,
            slot_bytes: slot_bytes as usize,
            path: None,
            gone_at: CONSUMER_GONE_AT,
            peer_gone_at: PRODUCER_GONE_AT,
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Removes the file (the mappings stay valid).
    pub fn unlink(&mut self) -> io::Result<()> {
        match self.path.take() {
            Some(path) => std::fs::remove_file(path),
            None => Ok(()),
        }
    }

    /// Whether the other end has torn its side down.
    pub fn peer_gone(&self) -> bool {
        self.map.len > 0 && self.map.u32_at(self.peer_gone_at).load(Ordering::Acquire) != 0
    }

    /// Tells the other end that this one is gone (on failure and on drop), waking it if it sleeps.
    pub fn mark_gone(&self) {
        if self.map.len > 0 {
            self.map.u32_at(self.gone_at).store(1, Ordering::SeqCst);
            for word in [DATA_SEQ_AT, SPACE_SEQ_AT] {
                let word = self.map.u32_at(word);
                word.fetch_add(1, Ordering::SeqCst);
                let _ = futex::wake(word, futex::Flags::empty(), u32::MAX);
            }
        }
    }

    /// After a publish (release): bumps `word` and wakes the other side if it said it sleeps.
    fn ring_bell(&self, word: usize, sleeping: usize) {
        let word = self.map.u32_at(word);
        word.fetch_add(1, Ordering::SeqCst);
        if self.map.u32_at(sleeping).load(Ordering::SeqCst) != 0 {
            let _ = futex::wake(word, futex::Flags::empty(), 1);
        }
    }

    /// Sleeps on `word` until the other side rings it, `done()` holds, the other side is gone, or
    /// `timeout` passes (spurious wake-ups are fine: the caller re-checks).
    fn sleep(&self, word: usize, sleeping: usize, timeout: Duration, done: impl Fn() -> bool) {
        let (word, flag) = (self.map.u32_at(word), self.map.u32_at(sleeping));
        flag.store(1, Ordering::SeqCst);
        let seen = word.load(Ordering::SeqCst);
        if !done() && !self.peer_gone() {
            let timeout = Timespec { tv_sec: timeout.as_secs() as i64, tv_nsec: timeout.subsec_nanos() as _ };
            let _ = futex::wait(word, futex::Flags::empty(), seen, Some(&timeout));
        }
        flag.store(0, Ordering::SeqCst);
    }

    fn head(&self) -> &AtomicU64 {
        self.map.u64_at(HEAD_AT)
    }

    fn tail(&self) -> &AtomicU64 {
        self.map.u64_at(TAIL_AT)
    }

    fn slot_start(&self, counter: u64) -> usize {
        HEADER_BYTES + (counter % SLOTS as u64) as usize * (SLOT_HEADER + self.slot_bytes)
    }
}

impl Drop for ShmRing {
    fn drop(&mut self) {
        self.mark_gone();
        let _ = self.unlink();
    }
}

/// The producer end.
#[derive(Debug)]
pub(super) struct ShmTx {
    ring: ShmRing,
    /// Segments published (the authoritative `head`).
    head: u64,
    /// Last `tail` read from the consumer.
    cached_tail: u64,
}

impl ShmTx {
    pub fn new(ring: ShmRing) -> Self {
        ShmTx { ring, head: 0, cached_tail: 0 }
    }

    pub fn ring(&self) -> &ShmRing {
        &self.ring
    }

    /// Largest segment a slot holds.
    pub fn max_segment(&self) -> usize {
        self.ring.slot_bytes
    }

    /// Copies one record into the next free slot and publishes it; `false` if the ring is full.
    pub fn try_send(&mut self, header: &RecordHeader, data: &[u8]) -> bool {
        debug_assert!(data.len() <= self.ring.slot_bytes);
        if self.head - self.cached_tail >= SLOTS as u64 {
            self.cached_tail = self.ring.tail().load(Ordering::Acquire);
            if self.head - self.cached_tail >= SLOTS as u64 {
                return false;
            }
        }
        let start = self.ring.slot_start(self.head);
        let slot = self.ring.map.bytes_mut(start, SLOT_HEADER + data.len());
        slot[..RECORD_LEN].copy_from_slice(&header.encode());
        slot[SLOT_HEADER..].copy_from_slice(data);
        self.head += 1;
        self.ring.head().store(self.head, Ordering::Release);
        self.ring.ring_bell(DATA_SEQ_AT, CONSUMER_SLEEPING_AT);
        true
    }

    /// Sleeps until the consumer frees a slot (or `timeout`, or it is gone).
    pub fn sleep_for_space(&self, timeout: Duration) {
        let tail = self.ring.tail();
        self.ring.sleep(SPACE_SEQ_AT, PRODUCER_SLEEPING_AT, timeout, || {
            self.head - tail.load(Ordering::SeqCst) < SLOTS as u64
        });
    }
}

/// The consumer end.
#[derive(Debug)]
pub(super) struct ShmRx {
    ring: ShmRing,
    /// Segments consumed (the authoritative `tail`).
    tail: u64,
    /// Last `head` read from the producer.
    cached_head: u64,
}

impl ShmRx {
    pub fn new(ring: ShmRing) -> Self {
        ShmRx { ring, tail: 0, cached_head: 0 }
    }

    pub fn ring(&self) -> &ShmRing {
        &self.ring
    }

    /// The oldest published record and its data, if any; `Err` if the counters or the header make no
    /// sense. Stays readable until `release`.
    pub fn peek(&mut self) -> Result<Option<(RecordHeader, &[u8])>, String> {
        if self.tail == self.cached_head {
            self.cached_head = self.ring.head().load(Ordering::Acquire);
            if self.tail == self.cached_head {
                return Ok(None);
            }
            if self.cached_head < self.tail || self.cached_head - self.tail > SLOTS as u64 {
                return Err(format!("shared ring counters out of order: head {} tail {}", self.cached_head, self.tail));
            }
        }
        let start = self.ring.slot_start(self.tail);
        let mut bytes = [0u8; RECORD_LEN];
        bytes.copy_from_slice(self.ring.map.bytes(start, RECORD_LEN));
        let header = RecordHeader::decode(&bytes);
        if header.seg_len > self.ring.slot_bytes as u64 {
            return Err(format!(
                "shared ring slot announces {} bytes, slots hold {}",
                header.seg_len, self.ring.slot_bytes
            ));
        }
        Ok(Some((header, self.ring.map.bytes(start + SLOT_HEADER, header.seg_len as usize))))
    }

    /// Frees the slot returned by the last `peek`.
    pub fn release(&mut self) {
        self.tail += 1;
        self.ring.tail().store(self.tail, Ordering::Release);
        self.ring.ring_bell(SPACE_SEQ_AT, PRODUCER_SLEEPING_AT);
    }

    /// Sleeps until the producer publishes (or `timeout`, or it is gone).
    pub fn sleep_for_data(&self, timeout: Duration) {
        let head = self.ring.head();
        self.ring.sleep(DATA_SEQ_AT, CONSUMER_SLEEPING_AT, timeout, || head.load(Ordering::SeqCst) != self.tail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::frame::{Expected, OpCode};

    fn record(step: u32, len: usize) -> RecordHeader {
        let e = Expected { op: OpCode::AllGather, dtype: 0, reduce: 0, step, seq: 1 };
        RecordHeader::data(e, len, len)
    }

    #[test]
    fn records_flow_in_order_through_a_wrapping_ring_and_the_file_is_unlinked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut producer = ShmRing::create(dir.path(), 3, 0, 1, 128).expect("create");
        let path = producer.path().expect("not yet unlinked").to_owned();
        let len = producer.len() as u64;
        assert!(ShmRing::open(&path, len, 4, 0, 1).is_err_and(|e| e.contains("generation 3")));
        let consumer = ShmRing::open(&path, len, 3, 0, 1).expect("open");
        producer.unlink().expect("unlink");
        assert!(!path.exists());
        let (mut tx, mut rx) = (ShmTx::new(producer), ShmRx::new(consumer));
        let mut next_read = 0u32;
        for step in 0..(3 * SLOTS as u32) {
            let data: Vec<u8> = (0..(step as usize % 129)).map(|i| (i as u8).wrapping_add(step as u8)).collect();
            while !tx.try_send(&record(step, data.len()), &data) {
                // Full: drain one, in order.
                let (header, bytes) = rx.peek().expect("sane").expect("full ring has a record");
                assert_eq!(header.step, next_read);
                assert!(bytes.iter().enumerate().all(|(i, &b)| b == (i as u8).wrapping_add(next_read as u8)));
                rx.release();
                next_read += 1;
            }
        }
        while let Some((header, _)) = rx.peek().expect("sane") {
            assert_eq!(header.step, next_read);
            rx.release();
            next_read += 1;
        }
        assert_eq!(next_read, 3 * SLOTS as u32);
        assert!(!rx.ring().peer_gone());
        drop(tx);
        assert!(rx.ring().peer_gone());
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
    }

    #[test]
    fn a_ring_that_is_never_mapped_by_the_consumer_is_removed_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ring = ShmRing::create(dir.path(), 1, 2, 3, 64).expect("create");
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1);
        drop(ring);
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
    }
}
