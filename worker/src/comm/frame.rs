//! Wire formats of the ring: the connection handshake (`Hello`), the link set-up that picks the
//! transport of each data link (`LinkOffer`, answered by a `LinkReply`), and the header in front of
//! every record (`RecordHeader`). A data record carries one segment of a message; an abort record
//! carries an `AbortNotice` (which rank reports which failure).
//!
//! Integers in these headers are little-endian. Element payloads travel in host byte order: the
//! handshake checks that both ends share it.

use super::element::dtype_name;

/// First bytes of every handshake: rejects stray connections (health probes, scanners, other services).
pub(crate) const MAGIC: [u8; 4] = *b"HCMC";
/// Bumped on any change of the handshake, the link set-up, the record header or a message sequence.
pub(crate) const PROTOCOL_VERSION: u16 = 2;
pub(crate) const HELLO_LEN: usize = 48;
pub(crate) const RECORD_LEN: usize = 32;
pub(crate) const OFFER_LEN: usize = 24;
pub(crate) const REPLY_LEN: usize = 8;
const FLAG_LITTLE_ENDIAN: u8 = 1;
pub(crate) const RECORD_DATA: u8 = 1;
pub(crate) const RECORD_ABORT: u8 = 2;
/// Longest reason an abort notice carries (longer ones are cut).
pub(crate) const MAX_REASON: usize = 2048;
/// Longest path a link offer may name, and longest reason a link reply may carry.
pub(crate) const MAX_LINK_TEXT: usize = 4096;

/// Which collective a record belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum OpCode {
    AllReduce = 1,
    AllGather = 2,
    Broadcast = 3,
    Barrier = 4,
    ReduceScatter = 5,
}

impl OpCode {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(OpCode::AllReduce),
            2 => Some(OpCode::AllGather),
            3 => Some(OpCode::Broadcast),
            4 => Some(OpCode::Barrier),
            5 => Some(OpCode::ReduceScatter),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            OpCode::AllReduce => "all_reduce",
            OpCode::AllGather => "all_gather",
            OpCode::Broadcast => "broadcast",
            OpCode::Barrier => "barrier",
            OpCode::ReduceScatter => "reduce_scatter",
        }
    }
}

fn op_name(code: u8) -> String {
    OpCode::from_u8(code).map_or_else(|| format!("unknown op {code}"), |op| op.name().to_owned())
}

/// Code of the reduction in data records: 0 none (gathers, broadcast), 1 sum, 2 average.
fn reduce_name(code: u8) -> &'static str {
    match code {
        0 => "none",
        1 => "sum",
        2 => "average",
        _ => "unknown",
    }
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Sent by the connecting rank, answered by the accepting one.
///
/// Layout (48 bytes): magic[4] | version u16 | flags u8 | reserved u8 | generation u64 | rank u64 |
/// world_size u64 | pid u32 | reserved u32 | process start time u64 (clock ticks since boot, from
/// /proc; 0 when unknown). The pid and start time let a neighbour on the same host watch the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hello {
    pub version: u16,
    pub little_endian: bool,
    pub generation: u64,
    pub rank: u64,
    pub world_size: u64,
    pub pid: u32,
    pub start_time: u64,
}

impl Hello {
    pub fn new(generation: u64, rank: usize, world_size: usize) -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            little_endian: cfg!(target_endian = "little"),
            generation,
            rank: rank as u64,
            world_size: world_size as u64,
            pid: std::process::id(),
            start_time: super::link::own_start_time(),
        }
    }

    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6] = if self.little_endian { FLAG_LITTLE_ENDIAN } else { 0 };
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..24].copy_from_slice(&self.rank.to_le_bytes());
        b[24..32].copy_from_slice(&self.world_size.to_le_bytes());
        b[32..36].copy_from_slice(&self.pid.to_le_bytes());
        b[40..48].copy_from_slice(&self.start_time.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, String> {
        if b[0..4] != MAGIC {
            return Err(format!("bad magic {:02x?} (not an hcmoco collective connection)", &b[0..4]));
        }
        Ok(Hello {
            version: le_u16(b, 4),
            little_endian: b[6] & FLAG_LITTLE_ENDIAN != 0,
            generation: le_u64(b, 8),
            rank: le_u64(b, 16),
            world_size: le_u64(b, 24),
            pid: le_u32(b, 32),
            start_time: le_u64(b, 40),
        })
    }

    /// Checks a received hello against the expected one (the pid is not compared); describes the
    /// first difference.
    pub fn check(&self, expected: &Hello) -> Result<(), String> {
        if self.version != expected.version {
            return Err(format!("protocol version {}, expected {}", self.version, expected.version));
        }
        if self.little_endian != expected.little_endian {
            return Err("peer has a different byte order".to_owned());
        }
        if self.generation != expected.generation {
            return Err(format!("generation {}, expected {}", self.generation, expected.generation));
        }
        if self.world_size != expected.world_size {
            return Err(format!("world size {}, expected {}", self.world_size, expected.world_size));
        }
        if self.rank != expected.rank {
            return Err(format!("sender rank {}, expected {}", self.rank, expected.rank));
        }
        Ok(())
    }
}

/// Sent by each rank to its right neighbour after the hellos: how data will flow on that link.
///
/// Layout: kind u8 (0 tcp, 1 shared memory) | reserved[7] | mapping length u64 | path length u64, then
/// the path of the shared-memory file (empty for tcp).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LinkOffer {
    /// `Some((path, length))`: data will flow through this shared-memory file; `None`: over tcp.
    pub shm: Option<(String, u64)>,
}

impl LinkOffer {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, path, len) = match &self.shm {
            Some((path, len)) => (1u8, path.as_bytes(), *len),
            None => (0u8, &[][..], 0),
        };
        let mut b = vec![0u8; OFFER_LEN];
        b[0] = kind;
        b[8..16].copy_from_slice(&len.to_le_bytes());
        b[16..24].copy_from_slice(&(path.len() as u64).to_le_bytes());
        b.extend_from_slice(path);
        b
    }

    /// Decodes the fixed part; returns the kind, the mapping length and the path length to read next.
    pub fn decode_fixed(b: &[u8; OFFER_LEN]) -> Result<(bool, u64, usize), String> {
        let path_len = le_u64(b, 16);
        if path_len > MAX_LINK_TEXT as u64 {
            return Err(format!("link offer names a path of {path_len} bytes"));
        }
        match b[0] {
            0 => Ok((false, 0, 0)),
            1 => Ok((true, le_u64(b, 8), path_len as usize)),
            k => Err(format!("unknown link kind {k}")),
        }
    }
}

/// The answer to a `LinkOffer`: status u8 (0 accepted, 1 declined: data goes over tcp) | reserved[3] |
/// reason length u32, then the reason for declining.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LinkReply {
    pub declined: Option<String>,
}

impl LinkReply {
    pub fn encode(&self) -> Vec<u8> {
        let reason = self.declined.as_deref().map_or(&[][..], |r| &r.as_bytes()[..r.len().min(MAX_LINK_TEXT)]);
        let mut b = vec![0u8; REPLY_LEN];
        b[0] = u8::from(self.declined.is_some());
        b[4..8].copy_from_slice(&(reason.len() as u32).to_le_bytes());
        b.extend_from_slice(reason);
        b
    }

    /// Decodes the fixed part; returns whether the offer was declined and the reason length to read.
    pub fn decode_fixed(b: &[u8; REPLY_LEN]) -> Result<(bool, usize), String> {
        let reason_len = le_u32(b, 4) as usize;
        if reason_len > MAX_LINK_TEXT {
            return Err(format!("link reply carries a reason of {reason_len} bytes"));
        }
        match b[0] {
            0 => Ok((false, reason_len)),
            1 => Ok((true, reason_len)),
            s => Err(format!("unknown link reply status {s}")),
        }
    }
}

/// In front of every record on a link (tcp stream or shared-memory slot).
///
/// Layout (32 bytes): kind u8 | op u8 | dtype u8 | reduce u8 | step u32 | seq u64 | message length u64
/// | segment length u64. `seq` counts the ring's collectives (the same on every rank when all call them
/// in the same order), `step` numbers the messages inside one collective, `dtype` is
/// `Element::WIRE_CODE` (0 for bytes), `reduce` the reduction (0 none, 1 sum, 2 average). A message of
/// `msg_len` bytes travels as records of `seg_len` bytes each (one record of 0 bytes if it is empty).
/// An abort record has only `kind` and `seg_len` (its payload: an `AbortNotice`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub kind: u8,
    pub op: u8,
    pub dtype: u8,
    pub reduce: u8,
    pub step: u32,
    pub seq: u64,
    pub msg_len: u64,
    pub seg_len: u64,
}

/// What a receiver expects of the next data record (all but the lengths).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Expected {
    pub op: OpCode,
    pub dtype: u8,
    pub reduce: u8,
    pub step: u32,
    pub seq: u64,
}

impl RecordHeader {
    pub fn data(e: Expected, msg_len: usize, seg_len: usize) -> Self {
        RecordHeader {
            kind: RECORD_DATA,
            op: e.op as u8,
            dtype: e.dtype,
            reduce: e.reduce,
            step: e.step,
            seq: e.seq,
            msg_len: msg_len as u64,
            seg_len: seg_len as u64,
        }
    }

    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0] = self.kind;
        b[1] = self.op;
        b[2] = self.dtype;
        b[3] = self.reduce;
        b[4..8].copy_from_slice(&self.step.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.msg_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.seg_len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; RECORD_LEN]) -> Self {
        RecordHeader {
            kind: b[0],
            op: b[1],
            dtype: b[2],
            reduce: b[3],
            step: le_u32(b, 4),
            seq: le_u64(b, 8),
            msg_len: le_u64(b, 16),
            seg_len: le_u64(b, 24),
        }
    }

    /// Checks a data record against what the receiver expects next (lengths are checked by the
    /// caller); describes the first difference.
    pub fn check(&self, e: &Expected) -> Result<(), String> {
        if self.kind != RECORD_DATA {
            return Err(format!("record of unknown kind {}", self.kind));
        }
        if self.op != e.op as u8 || self.seq != e.seq {
            return Err(format!(
                "received {} (collective #{}), expected {} (collective #{}): ranks called collectives in a different order",
                op_name(self.op),
                self.seq,
                e.op.name(),
                e.seq
            ));
        }
        if self.dtype != e.dtype {
            return Err(format!("element type {} from peer, {} here", dtype_name(self.dtype), dtype_name(e.dtype)));
        }
        if self.reduce != e.reduce {
            return Err(format!("reduction {} from peer, {} here", reduce_name(self.reduce), reduce_name(e.reduce)));
        }
        if self.step != e.step {
            return Err(format!("message for step {}, expected step {}", self.step, e.step));
        }
        Ok(())
    }
}

/// Payload of an abort record: rank `origin` failed its collective because of `reason`, and suspects
/// rank `failed` (none for an abort requested through an `AbortHandle`).
///
/// Layout: origin u64 | failed u64 (u64::MAX: none) | reason (UTF-8, at most `MAX_REASON` bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AbortNotice {
    pub origin: usize,
    pub failed: Option<usize>,
    pub reason: String,
}

impl AbortNotice {
    /// The whole record: header and payload.
    pub fn encode_record(&self) -> Vec<u8> {
        let mut end = self.reason.len().min(MAX_REASON);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        let reason = &self.reason.as_bytes()[..end];
        let payload_len = 16 + reason.len();
        let header = RecordHeader {
            kind: RECORD_ABORT,
            op: 0,
            dtype: 0,
            reduce: 0,
            step: 0,
            seq: 0,
            msg_len: payload_len as u64,
            seg_len: payload_len as u64,
        };
        let mut b = Vec::with_capacity(RECORD_LEN + payload_len);
        b.extend_from_slice(&header.encode());
        b.extend_from_slice(&(self.origin as u64).to_le_bytes());
        b.extend_from_slice(&self.failed.map_or(u64::MAX, |f| f as u64).to_le_bytes());
        b.extend_from_slice(reason);
        b
    }

    pub fn decode(payload: &[u8]) -> Result<Self, String> {
        if payload.len() < 16 {
            return Err(format!("abort notice of {} bytes is shorter than its header", payload.len()));
        }
        let failed = le_u64(payload, 8);
        Ok(AbortNotice {
            origin: le_u64(payload, 0) as usize,
            failed: (failed != u64::MAX).then_some(failed as usize),
            reason: String::from_utf8_lossy(&payload[16..]).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn hello_round_trips(generation: u64, rank: u32, world in 1u32..1024, le: bool, pid: u32, start: u64) {
            let mut h = Hello::new(generation, rank as usize, world as usize);
            h.little_endian = le;
            h.pid = pid;
            h.start_time = start;
            let decoded = Hello::decode(&h.encode()).expect("decode");
            prop_assert_eq!(decoded, h);
            prop_assert!(decoded.check(&h).is_ok());
        }

        #[test]
        fn record_header_round_trips(kind: u8, op: u8, dtype: u8, reduce: u8, step: u32, seq: u64, msg_len: u64, seg_len: u64) {
            let h = RecordHeader { kind, op, dtype, reduce, step, seq, msg_len, seg_len };
            prop_assert_eq!(RecordHeader::decode(&h.encode()), h);
        }

        #[test]
        fn abort_notice_round_trips(origin in 0usize..1000, failed in proptest::option::of(0usize..1000), reason in ".{0,100}") {
            let n = AbortNotice { origin, failed, reason };
            let record = n.encode_record();
            let header = RecordHeader::decode(record[..RECORD_LEN].try_into().expect("header"));
            prop_assert_eq!(header.kind, RECORD_ABORT);
            prop_assert_eq!(header.seg_len as usize, record.len() - RECORD_LEN);
            prop_assert_eq!(AbortNotice::decode(&record[RECORD_LEN..]).expect("decode"), n);
        }

        #[test]
        fn link_messages_round_trip(path in "[a-z/0-9-]{0,60}", len: u64, reason in proptest::option::of("[a-z ]{0,40}")) {
            let offer = LinkOffer { shm: Some((path.clone(), len)) };
            let b = offer.encode();
            let (shm, l, path_len) = LinkOffer::decode_fixed(b[..OFFER_LEN].try_into().expect("fixed")).expect("decode");
            prop_assert!(shm);
            prop_assert_eq!(l, len);
            prop_assert_eq!(&b[OFFER_LEN..OFFER_LEN + path_len], path.as_bytes());
            let reply = LinkReply { declined: reason.clone() };
            let b = reply.encode();
            let (declined, reason_len) = LinkReply::decode_fixed(b[..REPLY_LEN].try_into().expect("fixed")).expect("decode");
            prop_assert_eq!(declined, reason.is_some());
            prop_assert_eq!(reason_len, reason.map_or(0, |r| r.len()));
        }
    }

    #[test]
    fn hello_rejects_bad_magic_and_mismatches() {
        let h = Hello::new(7, 1, 3);
        let mut bytes = h.encode();
        bytes[0] = b'X';
        assert!(Hello::decode(&bytes).is_err_and(|e| e.contains("magic")));

        let other = Hello::new(8, 1, 3);
        assert!(other.check(&h).is_err_and(|e| e.contains("generation 8, expected 7")));
        let other = Hello::new(7, 2, 3);
        assert!(other.check(&h).is_err_and(|e| e.contains("sender rank 2, expected 1")));
        let other = Hello::new(7, 1, 4);
        assert!(other.check(&h).is_err_and(|e| e.contains("world size 4, expected 3")));
    }

    #[test]
    fn record_check_names_the_difference() {
        let expected = |op, dtype, reduce, step, seq| Expected { op, dtype, reduce, step, seq };
        let h = RecordHeader::data(expected(OpCode::AllGather, 0, 0, 0, 5), 10, 10);
        assert!(h.check(&expected(OpCode::AllGather, 0, 0, 0, 5)).is_ok());
        let e = h.check(&expected(OpCode::AllReduce, 1, 1, 0, 5)).expect_err("op differs");
        assert!(e.contains("received all_gather") && e.contains("expected all_reduce"), "{e}");
        let e = h.check(&expected(OpCode::AllGather, 0, 0, 0, 6)).expect_err("seq differs");
        assert!(e.contains("#5") && e.contains("#6"), "{e}");
        let h = RecordHeader::data(expected(OpCode::AllReduce, 2, 1, 1, 5), 8, 8);
        let e = h.check(&expected(OpCode::AllReduce, 1, 1, 1, 5)).expect_err("dtype differs");
        assert!(e.contains("f64 from peer, f32 here"), "{e}");
        let e = h.check(&expected(OpCode::AllReduce, 2, 2, 1, 5)).expect_err("reduction differs");
        assert!(e.contains("reduction sum from peer, average here"), "{e}");
    }
}
