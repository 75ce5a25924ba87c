//! The hcmoco worker: everything that touches tensors.
//!
//! Layout:
//! - [`comm`]: the [`comm::Communicator`] abstraction and its CPU backend (a TCP ring between ranks).
//! - [`model`]: the encoders (RGB, depth, keypoints) and their variables.
//! - [`batch`]: decoded samples -> one rank's batch tensors and modality masks.
//! - [`loader`]: decode + augment on a thread pool off the training thread, one step ahead.
//! - [`loss`]: the sample-level in-batch terms as one rank's share of the global-batch loss.
//! - [`buckets`]: gradient fusion: fixed-size buckets in a deterministic order.
//! - [`bench`]: `hcmoco-worker bench`: collective benchmarks, one process per rank.
//! - [`optim`]: SGD with momentum whose buffers are explicit, checkpointable tensors.
//! - [`train`]: [`train::Trainer`]: one cross-rank training step (gather, share, gradient sums).
//! - [`checkpoint`]: atomic safetensors + JSON checkpoints.
//! - [`run`]: the worker process: join, rendezvous, the training thread, heartbeats.

pub mod batch;
pub mod bench;
pub mod buckets;
pub mod checkpoint;
pub mod comm;
pub mod loader;
pub mod loss;
pub mod model;
pub mod optim;
pub mod run;
pub mod train;
