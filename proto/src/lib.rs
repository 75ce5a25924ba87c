//! The hcmoco wire contract and the domain types shared by the coordinator and the workers.
//!
//! Layout:
//! - [`pb`]: the generated `hcmoco.v1` messages, clients and servers (from `hcmoco/v1/hcmoco.proto`).
//!   Generated types stop at the service boundary.
//! - [`domain`]: validated request types. Every request is converted once, on receive, with `TryFrom`;
//!   a bad field becomes [`FieldError`], answered as `InvalidArgument` naming the field.
//! - [`config`]: the job file (TOML): every key, its default, and its validation. The coordinator
//!   resolves it once and hands the resolved text to the workers.

pub mod config;
pub mod domain;

/// Generated protobuf messages and gRPC stubs for package `hcmoco.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("hcmoco.v1");
}

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("hcmoco_v1_descriptor");

pub use config::{ConfigError, JobConfig};

/// A coordinator address as a URI: `host:port` gets `http://`; a full URI is kept.
pub fn endpoint_uri(addr: &str) -> String {
    if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") }
}
pub use domain::FieldError;
