//! Gradient fusion: parameter gradients concatenated once into a flat tensor (the parameters' flat
//! order, [`crate::flat::Flat`]), whose fixed-size segments (buckets) are all-reduced in place; the
//! optimizer consumes the flat result directly, so nothing is unpacked.
//!
//! The plan depends only on the parameters' shapes, in the order given (the model's name order), so it
//! is identical on every rank. Tensors are taken in order; a bucket is closed when the next tensor would
//! make it exceed the bucket size (a tensor larger than a bucket gets one of its own). A parameter
//! without a gradient this step (e.g. the depth encoder on a rank whose slice has no depth) is packed
//! as zeros, in the same place, on every rank, so ranks never disagree on a bucket's layout.

use std::ops::Range;

use tch::{Kind, Tensor};

use crate::comm::{CommError, Communicator};

/// The default bucket size (as DDP's).
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

#[derive(Debug, Clone)]
pub struct BucketPlan {
    shapes: Vec<Vec<i64>>,
    kind: Kind,
    /// Where packed buckets live (the parameters' device).
    device: tch::Device,
    /// Tensor index ranges, one per bucket.
    buckets: Vec<Range<usize>>,
}

impl BucketPlan {
    /// Plans buckets of at most `bucket_bytes` (0: one tensor per bucket).
    pub fn new(shapes: &[Vec<i64>], kind: Kind, device: tch::Device, bucket_bytes: usize) -> BucketPlan {
        let elem = kind.elt_size_in_bytes();
        let mut buckets = Vec::new();
        let (mut start, mut bytes) = (0usize, 0usize);
        for (i, s) in shapes.iter().enumerate() {
            let b = s.iter().product::<i64>().max(0) as usize * elem;
            if i > start && bytes + b > bucket_bytes {
                buckets.push(start..i);
                (start, bytes) = (i, 0);
            }
            bytes += b;
        }
        if start < shapes.len() {
            buckets.push(start..shapes.len());
        }
        BucketPlan { shapes: shapes.to_vec(), kind, device, buckets }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The tensor indices of bucket `b`.
    pub fn bucket(&self, b: usize) -> Range<usize> {
        self.buckets[b].clone()
    }

    fn numel(&self, i: usize) -> i64 {
        self.shapes[i].iter().product()
    }

    /// Sums the gradients over ranks into one flat tensor in the parameters' order (the layout of
    /// [`crate::flat::Flat`]): the gradients are concatenated once (a missing one as zeros) and each
    /// bucket is all-reduced in place as a segment of it.
    pub fn all_reduce_flat(&self, comm: &mut dyn Communicator, grads: &[Option<Tensor>]) -> Result<Tensor, CommError> {
        let parts: Vec<Tensor> = (0..self.shapes.len())
            .map(|i| match grads.get(i).and_then(Option::as_ref) {
                Some(g) => g.detach().to_device(self.device).to_kind(self.kind).reshape([-1]),
                None => Tensor::zeros([self.numel(i)], (self.kind, self.device)),
            })
            .collect();
        let flat = if parts.is_empty() { Tensor::zeros([0], (self.kind, self.device)) } else { Tensor::cat(&parts, 0) };
        let mut offset = 0;
        for b in &self.buckets {
            let n: i64 = b.clone().map(|i| self.numel(i)).sum();
            let mut segment = flat.narrow(0, offset, n);
            comm.all_reduce_sum(&mut segment)?;
            offset += n;
        }
        Ok(flat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes() -> Vec<Vec<i64>> {
        vec![vec![4, 3], vec![5], vec![100], vec![2, 2], vec![1]]
    }

    #[test]
    fn plan_is_deterministic_and_respects_the_size() {
        // f32: sizes 48, 20, 400, 16, 4 bytes; buckets of 64 bytes.
        let p = BucketPlan::new(&shapes(), Kind::Float, tch::Device::Cpu, 64);
        assert_eq!(p.buckets, vec![0..1, 1..2, 2..3, 3..5]);
        let one = BucketPlan::new(&shapes(), Kind::Float, tch::Device::Cpu, DEFAULT_BUCKET_BYTES);
        assert_eq!(one.buckets, vec![0..5]);
        let per_tensor = BucketPlan::new(&shapes(), Kind::Float, tch::Device::Cpu, 0);
        assert_eq!(per_tensor.len(), 5);
        assert!(BucketPlan::new(&[], Kind::Float, tch::Device::Cpu, 64).is_empty());
    }

    #[test]
    fn flat_all_reduce_sums_over_ranks_in_parameter_order() {
        use crate::comm::testing::{TEST_TIMEOUT, TRANSPORTS, bind_listeners, one_host, options, run_listeners};
        let shapes = shapes();
        // Rank r's gradient of tensor i is (r + 1) * (i + 1) everywhere, except that rank 1 has none for
        // tensor 1 and no rank has one for tensor 4.
        let grads = |rank: usize| -> Vec<Option<Tensor>> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let missing = i == 4 || (rank == 1 && i == 1);
                    (!missing).then(|| {
                        Tensor::full(s.as_slice(), ((rank + 1) * (i + 1)) as f64, (Kind::Float, tch::Device::Cpu))
                    })
                })
                .collect()
        };
        for bytes in [0, 64, 1 << 20] {
            let (listeners, peers) = bind_listeners(2);
            let results = run_listeners(listeners, &peers, |rank, listener, peers| {
                let opts = options(TRANSPORTS[0], TEST_TIMEOUT);
                let mut comm = crate::comm::connect_cpu_with(listener, rank, &one_host(peers), 1, &opts).expect("ring");
                let plan = BucketPlan::new(&shapes, Kind::Float, tch::Device::Cpu, bytes);
                plan.all_reduce_flat(&mut comm, &grads(rank)).expect("all-reduce")
            });
            let mut want = Vec::new();
            for (i, s) in shapes.iter().enumerate() {
                let n: i64 = s.iter().product();
                let v = match i {
                    4 => 0.0,
                    1 => 2.0, // rank 0 only
                    _ => 3.0 * (i + 1) as f64,
                };
                want.extend(std::iter::repeat_n(v as f32, n as usize));
            }
            for r in &results {
                assert_eq!(Vec::<f32>::try_from(r).expect("f32"), want, "buckets of {bytes} bytes");
            }
        }
    }
}
