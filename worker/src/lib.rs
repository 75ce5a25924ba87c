//! The hcmoco worker: everything that touches tensors.
//!
//! Layout:
//! - [`comm`]: the [`comm::Communicator`] abstraction and its CPU backend (a TCP ring between ranks).
//! - [`model`]: the encoders (RGB, depth, keypoints) and their variables.
//! - [`hrnet`]: the HRNetV2 image backbone (official/timm parameter names), BatchNorm with PyTorch's buffers.
//! - [`semgcn`]: the SemGCN keypoint encoder (semantic graph convolutions over the skeleton).
//! - [`batch`]: decoded samples -> one rank's batch tensors and modality masks.
//! - [`loader`]: decode + augment on a thread pool off the training thread, one step ahead.
//! - [`loss`]: every term of the objective as one rank's share of the global-batch loss; memory banks.
//! - [`loss_eval`]: `hcmoco-worker loss-eval`: the objective and its gradients on given features.
//! - [`buckets`]: gradient fusion: fixed-size buckets in a deterministic order.
//! - [`bench`]: `hcmoco-worker bench`: collective benchmarks, one process per rank.
//! - [`optim`]: SGD with momentum whose buffers are explicit, checkpointable tensors.
//! - [`train`]: [`train::Trainer`]: one cross-rank training step (gather, share, gradient sums).
//! - [`checkpoint`]: atomic safetensors + JSON checkpoints.
//! - [`weights`]: safetensors with metadata; loading named tensors with name and shape validation.
//! - [`export`]: `hcmoco-worker export` / `encode`: an image encoder as a PyTorch-loadable file, and running it.
//! - [`run`]: the worker process: join, rendezvous, the training thread, heartbeats.

pub mod autocast;
pub mod batch;
pub mod bench;
pub mod bench_step;
pub mod buckets;
pub mod checkpoint;
pub mod comm;
pub mod export;
pub mod flat;
pub mod hrnet;
pub mod loader;
pub mod loss;
pub mod loss_eval;
pub mod model;
pub mod objective;
pub mod optim;
pub mod run;
pub mod semgcn;
pub mod train;
pub mod weights;
