//! `Link`: framed, timed i/o with one ring neighbour; `Links`: both neighbours of a rank.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use super::error::CommError;
use super::frame::{FrameHeader, HEADER_LEN, OpCode};

/// Payloads up to this size are sent in one write together with their header.
const SMALL_FRAME: usize = 4096;
/// Upper bound on a variable-length payload announced by a peer (guards the allocation).
const MAX_PAYLOAD: u64 = 1 << 36;

/// One neighbour: the socket, and who is on the other end (for error messages).
#[derive(Debug)]
pub(super) struct Link {
    pub stream: TcpStream,
    pub peer_rank: usize,
    pub peer_addr: String,
    pub timeout: Duration,
}

impl Link {
    pub(super) fn io_error(&self, op: &'static str, e: io::Error) -> CommError {
        let source = if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            io::Error::new(io::ErrorKind::TimedOut, format!("no progress within {:?}", self.timeout))
        } else {
            e
        };
        CommError::Peer { op, peer_rank: self.peer_rank, peer_addr: self.peer_addr.clone(), source }
    }

    pub(super) fn protocol(&self, op: &'static str, detail: String) -> CommError {
        CommError::Protocol { op, peer_rank: self.peer_rank, detail }
    }

    pub(super) fn write_raw(&self, op: &'static str, bytes: &[u8]) -> Result<(), CommError> {
        (&self.stream).write_all(bytes).map_err(|e| self.io_error(op, e))
    }

    pub(super) fn read_raw(&self, op: &'static str, buf: &mut [u8]) -> Result<(), CommError> {
        (&self.stream).read_exact(buf).map_err(|e| self.io_error(op, e))
    }

    pub(super) fn write_frame(&self, op: &'static str, header: FrameHeader, payload: &[u8]) -> Result<(), CommError> {
        if payload.len() <= SMALL_FRAME {
            let mut message = Vec::with_capacity(HEADER_LEN + payload.len());
            message.extend_from_slice(&header.encode());
            message.extend_from_slice(payload);
            self.write_raw(op, &message)
        } else {
            self.write_raw(op, &header.encode())?;
            self.write_raw(op, payload)
        }
    }

    /// Reads the next header and checks it against the expected op, element type, step and sequence.
    pub(super) fn read_header(
        &self,
        op: &'static str,
        code: OpCode,
        dtype: u8,
        step: u32,
        seq: u64,
    ) -> Result<FrameHeader, CommError> {
        let mut bytes = [0u8; HEADER_LEN];
        self.read_raw(op, &mut bytes)?;
        let header = FrameHeader::decode(&bytes);
        header.check(code, dtype, step, seq).map_err(|detail| self.protocol(op, detail))?;
        Ok(header)
    }

    /// Reads a header that must announce exactly `expected_len` payload bytes.
    pub(super) fn read_fixed_header(
        &self,
        op: &'static str,
        code: OpCode,
        dtype: u8,
        step: u32,
        seq: u64,
        expected_len: usize,
    ) -> Result<(), CommError> {
        let header = self.read_header(op, code, dtype, step, seq)?;
        if header.len != expected_len as u64 {
            return Err(self.protocol(
                op,
                format!(
                    "step {step}: peer sent {} bytes, this rank expected {expected_len} (do all ranks pass buffers of the same length?)",
                    header.len
                ),
            ));
        }
        Ok(())
    }

    /// Reads a header announcing a variable-length payload; returns its length.
    pub(super) fn read_variable_header(
        &self,
        op: &'static str,
        code: OpCode,
        step: u32,
        seq: u64,
    ) -> Result<usize, CommError> {
        let header = self.read_header(op, code, 0, step, seq)?;
        if header.len > MAX_PAYLOAD {
            return Err(
                self.protocol(op, format!("announced payload of {} bytes exceeds the limit {MAX_PAYLOAD}", header.len))
            );
        }
        usize::try_from(header.len)
            .map_err(|_| self.protocol(op, format!("announced payload of {} bytes does not fit in memory", header.len)))
    }
}

/// The two neighbours of a rank in a ring of at least two.
#[derive(Debug)]
pub(super) struct Links {
    pub right: Link,
    pub left: Link,
}

impl Links {
    /// Best effort: wakes any blocked read or write on either socket and tells the neighbours.
    pub(super) fn shutdown(&self) {
        let _ = self.right.stream.shutdown(Shutdown::Both);
        let _ = self.left.stream.shutdown(Shutdown::Both);
    }
}
