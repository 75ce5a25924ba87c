//! NCCL backend (placeholder: being written).
