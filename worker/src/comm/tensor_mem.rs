//! Element views of a dense CPU tensor's memory, so that collectives reduce straight in (and send
//! straight out of) the tensor instead of copying it into a buffer and back.
//!
//! Contract (the same as libtorch's own): while a collective runs on a tensor, no other thread uses a
//! tensor sharing its storage. Writes through these views bypass autograd's version counter, like
//! writes to `.data` in Python: fine for gradients and parameters under `no_grad`.

#![allow(unsafe_code)]

use tch::{Device, Kind, Tensor};

/// Number of elements if `t` is a defined, dense, contiguous CPU tensor of `kind` whose element size is
/// that of `T`, with memory aligned for `T`.
fn viewable<T>(t: &Tensor, kind: Kind) -> Option<usize> {
    let ok = t.defined()
        && t.device() == Device::Cpu
        && t.kind() == kind
        && kind.elt_size_in_bytes() == size_of::<T>()
        && !t.is_sparse()
        && !t.is_mkldnn()
        && t.is_contiguous();
    if !ok {
        return None;
    }
    let n = t.numel();
    if n == 0 {
        return Some(0);
    }
    let ptr = t.data_ptr().cast::<T>();
    (!ptr.is_null() && ptr.is_aligned()).then_some(n)
}

/// Whether `with_elems` and `with_elems_mut` can view `t` in place.
pub(super) fn is_viewable<T>(t: &Tensor, kind: Kind) -> bool {
    viewable::<T>(t, kind).is_some()
}

/// Runs `f` on the elements of `t` in memory order; `None` if `t` cannot be viewed (see `viewable`).
pub(super) fn with_elems<T: bytemuck::Pod, R>(t: &Tensor, kind: Kind, f: impl FnOnce(&[T]) -> R) -> Option<R> {
    let n = viewable::<T>(t, kind)?;
    if n == 0 {
        return Some(f(&[]));
    }
    // SAFETY: `viewable` checked that `t` is a dense contiguous CPU tensor of `n` elements of `T`'s size
    // with a non-null, aligned data pointer; its storage is kept alive by `t`, borrowed for the whole
    // call, and (by the module's contract) nothing writes it meanwhile. Every bit pattern is a valid
    // `T` (Pod).
    let elems = unsafe { std::slice::from_raw_parts(t.data_ptr().cast::<T>(), n) };
    Some(f(elems))
}

/// Runs `f` on the elements of `t` in memory order, mutably; `None` if `t` cannot be viewed.
pub(super) fn with_elems_mut<T: bytemuck::Pod, R>(
    t: &mut Tensor,
    kind: Kind,
    f: impl FnOnce(&mut [T]) -> R,
) -> Option<R> {
    let n = viewable::<T>(t, kind)?;
    if n == 0 {
        return Some(f(&mut []));
    }
    // SAFETY: as in `with_elems`; `t` is borrowed mutably for the whole call and a contiguous tensor's
    // elements do not overlap, so this is the only access to them.
    let elems = unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<T>(), n) };
    Some(f(elems))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_only_dense_contiguous_tensors_of_the_right_kind() {
        let mut t = Tensor::arange(6, (Kind::Float, Device::Cpu));
        let sum = with_elems::<f32, _>(&t, Kind::Float, |v| v.iter().sum::<f32>());
        assert_eq!(sum, Some(15.0));
        with_elems_mut::<f32, _>(&mut t, Kind::Float, |v| v[5] = -1.0).expect("viewable");
        assert_eq!(t.double_value(&[5]), -1.0);
        assert!(with_elems::<f64, _>(&t, Kind::Double, |_| ()).is_none(), "wrong kind");
        assert!(!is_viewable::<f32>(&t.view([2, 3]).tr(), Kind::Float), "transposed");
        let tail = t.narrow(0, 2, 3);
        assert_eq!(with_elems::<f32, _>(&tail, Kind::Float, <[f32]>::to_vec), Some(vec![2.0, 3.0, 4.0]));
        let empty = Tensor::zeros([0, 3], (Kind::Float, Device::Cpu));
        assert_eq!(with_elems::<f32, _>(&empty, Kind::Float, |v| v.len()), Some(0));
    }
}
