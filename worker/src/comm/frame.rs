//! Wire formats of the tcp ring: the connection handshake (`Hello`) and the header in front of every
//! message (`FrameHeader`).
//!
//! Integers in these headers are little-endian. Element payloads travel in host byte order: the
//! handshake checks that both ends share it.

/// First bytes of every handshake: rejects stray connections (health probes, scanners, other services).
pub(crate) const MAGIC: [u8; 4] = *b"HCMC";
/// Bumped on any change of the handshake, the frame header or an operation's message sequence.
pub(crate) const PROTOCOL_VERSION: u16 = 1;
pub(crate) const HELLO_LEN: usize = 32;
pub(crate) const HEADER_LEN: usize = 24;
const FLAG_LITTLE_ENDIAN: u8 = 1;

/// Which collective a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum OpCode {
    AllReduce = 1,
    AllGather = 2,
    Broadcast = 3,
    Barrier = 4,
}

impl OpCode {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(OpCode::AllReduce),
            2 => Some(OpCode::AllGather),
            3 => Some(OpCode::Broadcast),
            4 => Some(OpCode::Barrier),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            OpCode::AllReduce => "all_reduce",
            OpCode::AllGather => "all_gather",
            OpCode::Broadcast => "broadcast",
            OpCode::Barrier => "barrier",
        }
    }
}

fn op_name(code: u8) -> String {
    OpCode::from_u8(code).map_or_else(|| format!("unknown op {code}"), |op| op.name().to_owned())
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
/// Layout (32 bytes): magic[4] | version u16 | flags u8 | reserved u8 | generation u64 | rank u64 |
/// world_size u64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hello {
    pub version: u16,
    pub little_endian: bool,
    pub generation: u64,
    pub rank: u64,
    pub world_size: u64,
}

impl Hello {
    pub fn new(generation: u64, rank: usize, world_size: usize) -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            little_endian: cfg!(target_endian = "little"),
            generation,
            rank: rank as u64,
            world_size: world_size as u64,
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
        })
    }

    /// Checks a received hello against the expected one; describes the first difference.
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

/// In front of every message.
///
/// Layout (24 bytes): op u8 | dtype u8 | reserved u16 | step u32 | seq u64 | payload length u64.
/// `seq` counts the ring's collectives (the same on every rank when all call them in the same order),
/// `step` numbers the messages inside one collective, `dtype` is `Element::WIRE_CODE` (0 for bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub op: u8,
    pub dtype: u8,
    pub step: u32,
    pub seq: u64,
    pub len: u64,
}

impl FrameHeader {
    pub fn new(op: OpCode, dtype: u8, step: u32, seq: u64, len: usize) -> Self {
        FrameHeader { op: op as u8, dtype, step, seq, len: len as u64 }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.op;
        b[1] = self.dtype;
        b[4..8].copy_from_slice(&self.step.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Self {
        FrameHeader { op: b[0], dtype: b[1], step: le_u32(b, 4), seq: le_u64(b, 8), len: le_u64(b, 16) }
    }

    /// Checks everything but the length against what the receiver expects next.
    pub fn check(&self, op: OpCode, dtype: u8, step: u32, seq: u64) -> Result<(), String> {
        if self.op != op as u8 || self.seq != seq {
            return Err(format!(
                "received {} (collective #{}), expected {} (collective #{}): ranks called collectives in a different order",
                op_name(self.op),
                self.seq,
                op.name(),
                seq
            ));
        }
        if self.dtype != dtype {
            return Err(format!("element type {} from peer, {} here", dtype_name(self.dtype), dtype_name(dtype)));
        }
        if self.step != step {
            return Err(format!("message for step {}, expected step {step}", self.step));
        }
        Ok(())
    }
}

/// Names of `Element::WIRE_CODE`s, for error messages.
fn dtype_name(code: u8) -> String {
    match code {
        0 => "bytes".to_owned(),
        1 => "f32".to_owned(),
        2 => "f64".to_owned(),
        3 => "bf16".to_owned(),
        4 => "f16".to_owned(),
        c => format!("dtype code {c}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn hello_round_trips(generation: u64, rank: u32, world in 1u32..1024, le: bool) {
            let mut h = Hello::new(generation, rank as usize, world as usize);
            h.little_endian = le;
            let decoded = Hello::decode(&h.encode()).expect("decode");
            prop_assert_eq!(decoded, h);
            prop_assert!(decoded.check(&h).is_ok());
        }

        #[test]
        fn header_round_trips(op in 1u8..=4, dtype: u8, step: u32, seq: u64, len: u64) {
            let h = FrameHeader { op, dtype, step, seq, len };
            prop_assert_eq!(FrameHeader::decode(&h.encode()), h);
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
    fn header_check_names_the_difference() {
        let h = FrameHeader::new(OpCode::AllGather, 0, 0, 5, 10);
        assert!(h.check(OpCode::AllGather, 0, 0, 5).is_ok());
        let e = h.check(OpCode::AllReduce, 1, 0, 5).expect_err("op differs");
        assert!(e.contains("received all_gather") && e.contains("expected all_reduce"), "{e}");
        let e = h.check(OpCode::AllGather, 0, 0, 6).expect_err("seq differs");
        assert!(e.contains("#5") && e.contains("#6"), "{e}");
        let h = FrameHeader::new(OpCode::AllReduce, 2, 1, 5, 8);
        let e = h.check(OpCode::AllReduce, 1, 1, 5).expect_err("dtype differs");
        assert!(e.contains("f64 from peer, f32 here"), "{e}");
    }
}
