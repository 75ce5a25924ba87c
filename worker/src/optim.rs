//! SGD with momentum and weight decay (PyTorch semantics, dampening 0, no Nesterov) whose momentum
//! buffers are explicit, named tensors: they are checkpointed with the weights and can be handed to a
//! new worker. tch's optimizer hides them, hence this.

use tch::Tensor;

#[derive(Debug)]
pub struct Sgd {
    pub momentum: f64,
    pub weight_decay: f64,
    names: Vec<String>,
    bufs: Vec<Tensor>,
}

impl Sgd {
    /// One zero buffer per parameter, in the parameters' order (`momentum(0) + g == g`, which is
    /// PyTorch's first-step initialisation).
    pub fn new(params: &[(String, Tensor)], momentum: f64, weight_decay: f64) -> Sgd {
        let names = params.iter().map(|(n, _)| n.clone()).collect();
        let bufs = params.iter().map(|(_, p)| p.detach().zeros_like()).collect();
        Sgd { momentum, weight_decay, names, bufs }
    }

    /// `p <- p - lr * (m * buf + g + wd * p)`, updating `buf` in place.
    pub fn step(&mut self, params: &[Tensor], grads: &[Tensor], lr: f64) {
        let _guard = tch::no_grad_guard();
        for ((p, g), buf) in params.iter().zip(grads).zip(&mut self.bufs) {
            let d = g + p * self.weight_decay;
            let _ = buf.g_mul_scalar_(self.momentum);
            let _ = buf.g_add_(&d);
            let mut p = p.shallow_clone();
            let _ = p.g_sub_(&(&*buf * lr));
        }
    }

    /// Momentum buffers named `momentum.<parameter>`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.names.iter().zip(&self.bufs).map(|(n, b)| (format!("momentum.{n}"), b.shallow_clone())).collect()
    }

    /// Restores buffers saved by [`Sgd::state`]; every parameter's buffer must be present.
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<(), String> {
        for (name, buf) in self.names.iter().zip(&mut self.bufs) {
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
        let mut opt = Sgd::new(&[("w".into(), p.shallow_clone())], 0.9, 0.1);
        let g = Tensor::from_slice(&[0.5f64, 0.5]);
        opt.step(&[p.shallow_clone()], &[g.shallow_clone()], 0.1);
        // buf1 = g + wd p = [0.6, 0.3]; p1 = p - 0.1 buf1 = [0.94, -2.03]
        let p1: Vec<f64> = Vec::try_from(&p.detach()).expect("f64");
        assert!((p1[0] - 0.94).abs() < 1e-12 && (p1[1] + 2.03).abs() < 1e-12, "{p1:?}");
        opt.step(&[p.shallow_clone()], &[g], 0.1);
        // buf2 = 0.9 buf1 + g + wd p1 = [0.54+0.5+0.094, 0.27+0.5-0.203]
        let p2: Vec<f64> = Vec::try_from(&p.detach()).expect("f64");
        assert!((p2[0] - (0.94 - 0.1 * 1.134)).abs() < 1e-12, "{p2:?}");
        assert!((p2[1] - (-2.03 - 0.1 * 0.567)).abs() < 1e-12, "{p2:?}");
        let st = opt.state();
        assert_eq!(st[0].0, "momentum.w");
        let mut other = Sgd::new(&[("w".into(), Tensor::zeros([2], (Kind::Double, Device::Cpu)))], 0.9, 0.1);
        other.load_state(&st).expect("load");
        assert!(other.state()[0].1.equal(&st[0].1));
        assert!(other.load_state(&[]).is_err());
    }
}
