//! The public entry points on a machine without a GPU (the GPU paths run in `self_check`).

use std::time::Duration;

use tch::{Device, Kind, Tensor};

use super::*;

#[test]
fn without_a_gpu_selecting_nccl_is_a_clear_error_not_a_panic() {
    let Err(why) = nccl_available() else {
        eprintln!("skipped: NCCL is usable on this machine (self_check covers it)");
        return;
    };
    assert!(why.starts_with("NCCL cannot be used here: "), "{why}");
    // Names what is missing and where it looked.
    assert!(
        ["libnccl.so.2", "libcudart", "libcuda.so.1", "no CUDA device"].iter().any(|lib| why.contains(lib)),
        "{why}"
    );
    assert!(why.contains("looked for") || why.contains("no CUDA device"), "{why}");

    for result in
        [nccl_unique_id().map(|_| ()), connect_nccl(0, 1, 1, &[7; 128], 0, Duration::from_secs(1)).map(|_| ())]
    {
        match result {
            Err(CommError::Unsupported { detail, .. }) => assert_eq!(detail, why),
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }
    // Asking again gives the same answer (the outcome of loading is cached, nothing is half-loaded).
    assert_eq!(nccl_available(), Err(why));
}

#[test]
fn the_nccl_that_libtorch_loaded_is_the_one_used() {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let Some(mapped) = search::mapped_library(&maps, "libnccl.so") else {
        eprintln!("skipped: this libtorch did not load NCCL (a CPU-only build)");
        return;
    };
    // Loading NCCL and asking its version needs no GPU.
    let api = ffi::nccl_api().expect("NCCL is mapped into the process, so it loads");
    assert!(api.source.starts_with(&mapped.display().to_string()), "{} vs {}", api.source, mapped.display());
    assert!(api.source.ends_with("(already loaded in this process)"), "{}", api.source);
    assert!(api.version >= 21400, "{}", api.version);
}

#[test]
fn connect_checks_its_arguments_before_loading_anything() {
    let second = Duration::from_secs(1);
    let cases: [(usize, usize, &[u8], Duration, &str); 4] = [
        (2, 2, &[0; 128], second, "rank 2 is not a rank of a world of 2"),
        (0, 0, &[0; 128], second, "world of 0"),
        (0, 1, &[0; 128], Duration::ZERO, "timeout is zero"),
        (0, 1, &[0; 16], second, "holds 16 bytes; an NCCL unique id (rank 0's nccl_unique_id) holds 128"),
    ];
    for (rank, world, bootstrap, timeout, expected) in cases {
        match connect_nccl(rank, world, 3, bootstrap, 0, timeout) {
            Err(CommError::InvalidArgument { op: "connect", detail }) => assert!(detail.contains(expected), "{detail}"),
            other => panic!("expected InvalidArgument ({expected}), got {other:?}"),
        }
    }
}

#[test]
fn a_cpu_tensor_is_unsupported_and_named() {
    let t = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
    for reduction in [false, true] {
        match check_tensor("all_reduce", &t, 0, reduction) {
            Err(CommError::Unsupported { op: "all_reduce", detail }) => {
                assert_eq!(detail, "tensor on Cpu; the NCCL communicator handles CUDA tensors (cuda:0) only")
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }
}

#[test]
fn only_float_double_and_bfloat16_are_reduced() {
    let reducible: Vec<Kind> = [Kind::Float, Kind::Double, Kind::BFloat16, Kind::Half, Kind::Int64, Kind::Bool]
        .into_iter()
        .filter(|k| reduce_dtype(*k).is_some())
        .collect();
    assert_eq!(reducible, vec![Kind::Float, Kind::Double, Kind::BFloat16]);
    assert_eq!(reduce_op(ReduceOp::Average), ncclRedOp_t::ncclAvg);
}

#[test]
fn disagreements_become_the_errors_of_the_cpu_backend() {
    match disagreement("barrier", Disagreement::Order { rank: 2, detail: "d".to_owned() }) {
        CommError::Protocol { op: "barrier", peer_rank: 2, .. } => {}
        other => panic!("{other:?}"),
    }
    match disagreement("broadcast", Disagreement::Mismatch { rank: 1, detail: "d".to_owned() }) {
        CommError::Mismatch { op: "broadcast", rank: 1, .. } => {}
        other => panic!("{other:?}"),
    }
}
