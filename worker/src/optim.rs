//! SGD with momentum and weight decay (PyTorch semantics, dampening 0, no Nesterov) whose momentum
//! buffers are explicit, named tensors: they are checkpointed with the weights and can be handed to a
//! new worker. tch's optimizer hides them, hence this.
//!
//! One difference from `torch.optim.SGD` (with or without DDP): a parameter that no rank gave a
//! gradient this step (the dense heads in stage 1, the depth encoder in a step where no rank has depth)
//! gets a zero gradient, so momentum and weight decay still move it, where PyTorch would leave its
//! gradient unset and skip it. The dense heads are replaced at the start of stage 2, so their stage-1
//! drift does not matter; the depth encoder only skips an update in a step without any depth.

use tch::Tensor;

use crate::flat::Flat;

/// SGD over a flat parameter tensor ([`crate::flat::Flat`]): one momentum buffer of the same size,
/// and each step is a few whole-tensor operations, whatever the number of parameters.
#[derive(Debug)]
pub struct Sgd {
    pub momentum: f64,
    pub weight_decay: f64,
    /// Names and shapes of the parameters, in flat order.
    layout: Flat,
    params: Tensor,
    buf: Tensor,
}

impl Sgd {
    /// A zero momentum buffer the size of `params` (`momentum(0) + g == g`, which is PyTorch's
    /// first-step initialisation). `params` is the flat tensor the model's parameters are views of.
    pub fn new(params: &Flat, momentum: f64, weight_decay: f64) -> Sgd {
        let layout = Flat { data: params.data.shallow_clone(), layout: params.layout.clone() };
        Sgd { momentum, weight_decay, params: params.data.shallow_clone(), buf: params.data.zeros_like(), layout }
    }

    /// `p <- p - lr * (m * buf + g + wd * p)`, updating `buf` in place; `grad` is flat, in the
    /// parameters' order.
    pub fn step(&mut self, grad: &Tensor, lr: f64) {
        let _guard = tch::no_grad_guard();
        let d = grad + &self.params * self.weight_decay;
        let _ = self.buf.g_mul_scalar_(self.momentum);
        let _ = self.buf.g_add_(&d);
        let _ = self.params.g_sub_(&(&self.buf * lr));
    }

    /// The flat momentum buffer (shares storage: writing it changes the optimizer's state).
    pub fn momentum_buffer(&self) -> Tensor {
        self.buf.shallow_clone()
    }

    /// Momentum buffers named `momentum.<parameter>` (views of the flat buffer).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.layout.views_of(&self.buf).into_iter().map(|(n, b)| (format!("momentum.{n}"), b)).collect()
    }

    /// Restores buffers saved by [`Sgd::state`]; every parameter's buffer must be present.
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<(), String> {
        for (name, mut buf) in self.layout.views_of(&self.buf) {
            let key = format!("momentum.{name}");
            let src = state.iter().find(|(n, _)| *n == key).ok_or_else(|| format!("optimizer state lacks {key}"))?;
            if src.1.size() != buf.size() {
                return Err(format!("optimizer state {key}: shape {:?}, expected {:?}", src.1.size(), buf.size()));
            }
            let _guard = tch::no_grad_guard();
            buf.copy_(&src.1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn matches_pytorch_sgd_by_hand() {
        let p = Tensor::from_slice(&[1.0f64, -2.0]).set_requires_grad(true);
        let flat = Flat::adopt(&[("w".into(), p.shallow_clone())], Kind::Double, Device::Cpu);
        let mut opt = Sgd::new(&flat, 0.9, 0.1);
        let g = Tensor::from_slice(&[0.5f64, 0.5]);
        opt.step(&g, 0.1);
        // buf1 = g + wd p = [0.6, 0.3]; p1 = p - 0.1 buf1 = [0.94, -2.03]
        let p1: Vec<f64> = Vec::try_from(&p.detach()).expect("f64");
        assert!((p1[0] - 0.94).abs() < 1e-12 && (p1[1] + 2.03).abs() < 1e-12, "{p1:?}");
        opt.step(&g, 0.1);
        // buf2 = 0.9 buf1 + g + wd p1 = [0.54+0.5+0.094, 0.27+0.5-0.203]
        let p2: Vec<f64> = Vec::try_from(&p.detach()).expect("f64");
        assert!((p2[0] - (0.94 - 0.1 * 1.134)).abs() < 1e-12, "{p2:?}");
        assert!((p2[1] - (-2.03 - 0.1 * 0.567)).abs() < 1e-12, "{p2:?}");
        let st = opt.state();
        assert_eq!(st[0].0, "momentum.w");
        let other_flat =
            Flat::adopt(&[("w".into(), Tensor::zeros([2], (Kind::Double, Device::Cpu)))], Kind::Double, Device::Cpu);
        let mut other = Sgd::new(&other_flat, 0.9, 0.1);
        other.load_state(&st).expect("load");
        assert!(other.state()[0].1.equal(&st[0].1));
        assert!(other.load_state(&[]).is_err());
    }
}
