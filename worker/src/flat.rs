//! Flat storage: a set of same-kind tensors re-homed as views into one contiguous 1-D tensor.
//!
//! The trainer keeps every parameter, every floating-point buffer and every integer buffer this way,
//! so the per-step work that touches all of them is a handful of whole-tensor operations instead of
//! one small kernel per tensor: SGD updates the flat parameters and momentum in place, the gradient
//! buckets are segments of one flat gradient, and the normalisation statistics are broadcast as one
//! tensor. The variables keep their identity (modules and the `VarStore` still hold them); only their
//! storage moves, as `param.data = flat[a:b].view_as(param)` does in PyTorch.

use tch::{Device, Kind, Tensor};

/// Tensors living as views into [`Flat::data`], in order.
#[derive(Debug)]
pub struct Flat {
    pub data: Tensor,
    /// Name and shape of each view, in storage order.
    pub layout: Vec<(String, Vec<i64>)>,
}

impl Flat {
    /// Copies `vars` (all of `kind`, on `device`) into one flat tensor and points each variable's
    /// storage at its slice of it.
    pub fn adopt(vars: &[(String, Tensor)], kind: Kind, device: Device) -> Flat {
        let total: i64 = vars.iter().map(|(_, t)| t.numel() as i64).sum();
        let data = Tensor::zeros([total], (kind, device));
        let _guard = tch::no_grad_guard();
        let mut offset = 0;
        let mut layout = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let shape = var.size();
            let n = var.numel() as i64;
            let mut view = data.narrow(0, offset, n).view(shape.as_slice());
            view.copy_(var);
            let mut var = var.shallow_clone();
            var.set_data(&view);
            layout.push((name.clone(), shape));
            offset += n;
        }
        Flat { data, layout }
    }

    /// Views of `flat` (a tensor of this layout's total size) with this layout's shapes, named.
    pub fn views_of(&self, flat: &Tensor) -> Vec<(String, Tensor)> {
        let mut offset = 0;
        self.layout
            .iter()
            .map(|(name, shape)| {
                let n: i64 = shape.iter().product();
                let v = flat.narrow(0, offset, n).view(shape.as_slice());
                offset += n;
                (name.clone(), v)
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.layout.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_become_views_and_keep_their_values() {
        let a = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0]).view([2, 2]).set_requires_grad(true);
        let b = Tensor::from_slice(&[5.0f64]);
        let held_by_a_module = a.shallow_clone();
        let flat =
            Flat::adopt(&[("a".into(), a.shallow_clone()), ("b".into(), b.shallow_clone())], Kind::Double, Device::Cpu);
        assert_eq!(Vec::<f64>::try_from(&flat.data).expect("f64"), vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        // An in-place update of the flat tensor is seen through every handle of the variables.
        let _ = flat.data.shallow_clone().g_mul_scalar_(2.0);
        assert_eq!(
            Vec::<f64>::try_from(&held_by_a_module.detach().reshape([-1])).expect("f64"),
            vec![2.0, 4.0, 6.0, 8.0]
        );
        assert_eq!(b.double_value(&[0]), 10.0);
        assert!(held_by_a_module.requires_grad(), "a parameter stays a parameter");
        assert_eq!(held_by_a_module.size(), vec![2, 2]);
        let views = flat.views_of(&flat.data);
        assert_eq!((views[0].0.as_str(), views[1].1.size()), ("a", vec![1]));
    }
}
