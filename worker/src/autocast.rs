//! bfloat16 autocast around the encoders' forward pass (`runtime.autocast = "bf16"`).
//!
//! tch's `autocast` switches libtorch's CUDA autocast on with its default dtype, float16, and does
//! nothing on the CPU. The method trains in bfloat16 (no loss scaling needed), so this module sets
//! the autocast dtype and state per device type through libtorch's own functions
//! (`at::autocast::set_autocast_dtype` / `set_autocast_enabled`, exported by libtorch_cpu, which every
//! tch binary links). Parameters stay in their dtype; autocast casts operands of the listed operations
//! (convolutions, matrix products) to bfloat16 and keeps precision-sensitive ones in float32.
//!
//! Like `torch.autocast`, the scope counts its nesting and clears libtorch's cast cache when the
//! outermost scope ends: the cache keeps the bfloat16 copy of every float32 parameter, keyed by the
//! tensor, and the optimizer updates parameters in place, so a cache outliving the forward pass would
//! feed the next step the previous step's weights.

// The four libtorch functions are declared here by their C++ symbol names.
#![allow(unsafe_code)]

use tch::Device;

// c10::DeviceType and c10::ScalarType are `enum class : int8_t`; on x86-64 and aarch64 they are
// passed like an i8 argument.
const DEVICE_CPU: i8 = 0;
const DEVICE_CUDA: i8 = 1;
const SCALAR_BFLOAT16: i8 = 15;

unsafe extern "C" {
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_set_autocast_dtype(device_type: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn at_get_autocast_dtype(device_type: i8) -> i8;
    #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
    fn at_set_autocast_enabled(device_type: i8, enabled: bool);
    #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
    fn at_is_autocast_enabled(device_type: i8) -> bool;
    #[link_name = "_ZN2at8autocast17increment_nestingEv"]
    fn at_increment_nesting() -> i32;
    #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
    fn at_decrement_nesting() -> i32;
    #[link_name = "_ZN2at8autocast11clear_cacheEv"]
    fn at_clear_cache();
}

fn device_type(device: Device) -> i8 {
    match device {
        Device::Cuda(_) => DEVICE_CUDA,
        _ => DEVICE_CPU,
    }
}

/// Runs `f` with bfloat16 autocast on `device`'s type when `enabled`, restoring the previous state
/// (enabled flag and dtype) afterwards, also when `f` panics.
pub fn bf16<T>(enabled: bool, device: Device, f: impl FnOnce() -> T) -> T {
    if !enabled {
        return f();
    }
    struct Restore {
        device_type: i8,
        enabled: bool,
        dtype: i8,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: plain functions over libtorch's thread-local autocast state.
            unsafe {
                if at_decrement_nesting() == 0 {
                    at_clear_cache();
                }
                at_set_autocast_enabled(self.device_type, self.enabled);
                at_set_autocast_dtype(self.device_type, self.dtype);
            }
        }
    }
    let dt = device_type(device);
    // SAFETY: getters and setters of libtorch's thread-local autocast state; the argument values are
    // valid enumerators of c10::DeviceType and c10::ScalarType.
    let _restore = unsafe {
        let restore =
            Restore { device_type: dt, enabled: at_is_autocast_enabled(dt), dtype: at_get_autocast_dtype(dt) };
        at_set_autocast_dtype(dt, SCALAR_BFLOAT16);
        at_set_autocast_enabled(dt, true);
        at_increment_nesting();
        restore
    };
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn matmul_runs_in_bfloat16_inside_and_float32_outside() {
        let a = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([8, 3], (Kind::Float, Device::Cpu));
        let inside = bf16(true, Device::Cpu, || a.mm(&b));
        assert_eq!(inside.kind(), Kind::BFloat16);
        // The result is close to the float32 product, to bfloat16's precision.
        let exact = a.mm(&b);
        assert_eq!(exact.kind(), Kind::Float);
        let err = (inside.to_kind(Kind::Float) - &exact).abs().max().double_value(&[]);
        assert!(err < 0.1, "bf16 matmul off by {err}");
        // Restored: off again, and `enabled = false` never switches it on.
        assert_eq!(bf16(false, Device::Cpu, || a.mm(&b)).kind(), Kind::Float);
        // SAFETY: a getter of libtorch's thread-local state.
        assert!(!unsafe { at_is_autocast_enabled(DEVICE_CPU) });
    }

    #[test]
    fn an_in_place_update_of_a_parameter_is_seen_by_the_next_scope() {
        // A parameter (float32, requires grad) is what libtorch's cast cache keeps a bfloat16 copy of.
        let w = Tensor::randn([8, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let first = bf16(true, Device::Cpu, || x.mm(&w));
        {
            let _guard = tch::no_grad_guard();
            let _ = w.shallow_clone().g_add_scalar_(1.0);
        }
        let second = bf16(true, Device::Cpu, || x.mm(&w));
        let expected = x.mm(&w.detach());
        let err = (second.to_kind(Kind::Float) - &expected).abs().max().double_value(&[]);
        assert!(err < 0.2, "the second forward used stale weights: off by {err}");
        assert!(!first.equal(&second), "the update must change the output");
    }
}
