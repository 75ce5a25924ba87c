//! What `connect_cpu_with` needs to know: the peers (address and host) and the transport options.

use std::path::PathBuf;
use std::time::Duration;

/// One rank of the rendezvous, as the coordinator hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Collective address, `host:port`.
    pub addr: String,
    /// Identifies the machine: ranks with equal `host_id` share memory.
    pub host_id: String,
}

/// How data flows between ring neighbours. The tcp connection to each neighbour is always made (it
/// carries the handshake, failure notices and liveness); this picks what carries the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Shared memory with a neighbour on the same host, tcp otherwise (and tcp if the shared-memory
    /// set-up fails, e.g. a full or missing tmpfs).
    #[default]
    Auto,
    Tcp,
    /// Shared memory with both neighbours; an error if either is on another host or the set-up fails.
    Shm,
}

/// A transport name that is not "auto", "tcp" or "shm".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown transport {0:?} (known: \"auto\", \"tcp\", \"shm\")")]
pub struct UnknownTransport(pub String);

impl std::str::FromStr for Transport {
    type Err = UnknownTransport;

    /// "auto", "tcp" or "shm" (as in the job file's `collective.transport`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Transport::Auto),
            "tcp" => Ok(Transport::Tcp),
            "shm" => Ok(Transport::Shm),
            other => Err(UnknownTransport(other.to_owned())),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Auto => "auto",
            Transport::Tcp => "tcp",
            Transport::Shm => "shm",
        })
    }
}

/// Options of the CPU communicator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuOptions {
    pub transport: Transport,
    /// Ring formation deadline, and the longest a collective waits without progress before it fails
    /// naming the peer it waits on.
    pub timeout: Duration,
    /// Size of the pipeline segments a ring step's chunk is cut into (tcp records and shared-memory
    /// slots); rounded down to a multiple of 64 bytes, at least 4 KiB.
    pub segment_bytes: usize,
    /// Where shared-memory ring files are created (a tmpfs). Each link needs
    /// `8 * (segment_bytes + 64) + 512` bytes there.
    pub shm_dir: PathBuf,
}

/// Default pipeline segment: small enough that a shared-memory ring (8 segments) stays in the last
/// level cache, large enough that per-segment costs (a header, a counter update, a syscall) vanish.
pub const DEFAULT_SEGMENT_BYTES: usize = 256 * 1024;
pub(super) const MIN_SEGMENT_BYTES: usize = 4096;
pub(super) const MAX_SEGMENT_BYTES: usize = 64 << 20;

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            transport: Transport::Auto,
            timeout: Duration::from_secs(30),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            shm_dir: PathBuf::from("/dev/shm"),
        }
    }
}

impl CpuOptions {
    /// `segment_bytes` as used: a multiple of 64 within [4 KiB, 64 MiB].
    pub(super) fn segment(&self) -> usize {
        self.segment_bytes.clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES) / 64 * 64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_parse_and_print_by_name() {
        for t in [Transport::Auto, Transport::Tcp, Transport::Shm] {
            assert_eq!(t.to_string().parse::<Transport>(), Ok(t));
        }
        let err = "rdma".parse::<Transport>().expect_err("unknown");
        assert_eq!(err.to_string(), "unknown transport \"rdma\" (known: \"auto\", \"tcp\", \"shm\")");
    }

    #[test]
    fn segments_are_clamped_to_multiples_of_64() {
        let with = |segment_bytes| CpuOptions { segment_bytes, ..CpuOptions::default() }.segment();
        assert_eq!(with(0), MIN_SEGMENT_BYTES);
        assert_eq!(with(100_000), 99_968);
        assert_eq!(with(usize::MAX), MAX_SEGMENT_BYTES);
    }
}
