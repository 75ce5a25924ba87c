//! `CommError`: every failure of a collective names the operation and, where one is involved, the peer.

use std::io;

/// Why a collective (or the ring set-up) failed.
///
/// After any error that happened while talking to peers (`Peer`, `Protocol`, `Reported`, `Aborted`,
/// `Local`) the ring is unusable: its connections are shut down and later calls return `Poisoned`. The
/// caller's way out is a new rendezvous generation. `Mismatch`, `Unsupported` and `InvalidArgument` are
/// detected before or after the exchange and leave the ring usable.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// Failure of a neighbour: timeout (no progress within the ring's timeout), connection reset or
    /// closed, its process gone.
    #[error("{op}: peer rank {peer_rank} ({peer_addr}): {}", describe_io(.source))]
    Peer { op: &'static str, peer_rank: usize, peer_addr: String, source: io::Error },
    /// A neighbour sent something other than what this rank expected (collectives called in a different
    /// order, buffers of different lengths, different element types, a corrupt stream).
    #[error("{op}: protocol error with peer rank {peer_rank}: {detail}")]
    Protocol { op: &'static str, peer_rank: usize, detail: String },
    /// The ring could not be formed: a neighbour missing, or it spoke another generation, world size or
    /// protocol version.
    #[error("connect: handshake of rank {rank} with {side} peer rank {peer_rank} ({peer_addr}) failed: {detail}")]
    Handshake {
        rank: usize,
        /// "left" (the neighbour this rank accepts) or "right" (the one it connects to).
        side: &'static str,
        peer_rank: usize,
        peer_addr: String,
        detail: String,
    },
    /// Ranks passed tensors that do not agree (shape or kind); `rank` is the rank whose tensor differs.
    #[error("{op}: tensor of rank {rank} does not match: {detail}")]
    Mismatch { op: &'static str, rank: usize, detail: String },
    /// The communicator cannot handle this input (a CUDA tensor, an unsupported kind).
    #[error("{op}: unsupported: {detail}")]
    Unsupported { op: &'static str, detail: String },
    /// A bad argument from the caller (rank out of range, zero timeout, root out of range).
    #[error("{op}: invalid argument: {detail}")]
    InvalidArgument { op: &'static str, detail: String },
    /// A local socket operation failed (not attributable to a peer).
    #[error("{op}: local socket error")]
    Local { op: &'static str, source: io::Error },
    /// libtorch refused a tensor operation while copying data in or out.
    #[error("{op}: tensor operation failed")]
    Tensor { op: &'static str, source: tch::TchError },
    /// Another rank failed and told the ring (an abort notice, passed on from rank to rank): `reporter`
    /// is the rank that failed first, `failed_rank` the rank it suspects (none when it was aborted).
    #[error("{op}: rank {reporter} reported: {reason}")]
    Reported { op: &'static str, reporter: usize, failed_rank: Option<usize>, reason: String },
    /// The communicator was aborted through its `AbortHandle` (e.g. the coordinator opened a new
    /// generation or failed the job).
    #[error("{op}: aborted: {reason}")]
    Aborted { op: &'static str, reason: String },
    /// An earlier collective failed; the ring is out of sync and its sockets are closed.
    #[error("{op}: communicator unusable after an earlier failure ({cause})")]
    Poisoned { op: &'static str, cause: String },
}

impl CommError {
    /// The rank suspected to have failed: the neighbour on whose connection the failure was observed
    /// (`Peer`, `Protocol`, `Handshake`), or for `Reported` the rank the reporter suspects (the
    /// reporter itself when it failed on its own). A rank that fails tells the others before closing
    /// its connections (completing a half-written record first), so they name the original suspect;
    /// only where the notice cannot be delivered (a stream that stays full for 300 ms, or one that is
    /// itself broken) may a neighbour name the rank that closed on it instead. `Mismatch` names
    /// a rank whose tensor differs, which is a caller bug rather than a failed peer: it is not reported
    /// here, nor is an abort.
    pub fn peer_rank(&self) -> Option<usize> {
        match self {
            CommError::Peer { peer_rank, .. }
            | CommError::Protocol { peer_rank, .. }
            | CommError::Handshake { peer_rank, .. } => Some(*peer_rank),
            CommError::Reported { failed_rank, .. } => *failed_rank,
            _ => None,
        }
    }

    /// The rank that reported the failure, for an error passed on from another rank.
    pub fn reporter(&self) -> Option<usize> {
        match self {
            CommError::Reported { reporter, .. } => Some(*reporter),
            _ => None,
        }
    }

    /// True for a read or write that made no progress within the ring's timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, CommError::Peer { source, .. }
            if matches!(source.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock))
    }
}

/// Short, lowercase reason for the top-level message; the full `io::Error` stays the error's source.
fn describe_io(e: &io::Error) -> &'static str {
    use io::ErrorKind as K;
    match e.kind() {
        K::TimedOut | K::WouldBlock => "timed out",
        K::UnexpectedEof | K::BrokenPipe => "connection closed",
        K::ConnectionReset | K::ConnectionAborted => "connection reset",
        K::ConnectionRefused => "connection refused",
        K::Interrupted => "interrupted",
        _ => "i/o error",
    }
}
