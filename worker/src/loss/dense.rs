//! The dense intra-sample term (DICL, method page, Losses 2), and the cell rules shared with SSCL:
//! which cells are foreground, how the P cells are drawn, and which cell a joint falls in.
//!
//! Conventions: a dense map is `C x h x w` at stride 4 of the input; a cell is addressed by
//! `(row, col)` or by its flat index `row * w + col`; distances between cells are Euclidean in cells.

use hcmoco_data::augment::mix;
use tch::{Kind, Tensor};

use super::normalize;
use super::stream::Stream;

/// Salt of the DICL cell stream ("dicldicl" in ASCII), so it differs from the augmentation stream of
/// the same `(seed, epoch, slot)`.
const DICL_SALT: u64 = 0x6469_636c_6469_636c;

/// Features at flat cell indices: `f` n x C x h x w, `flat` n x K int64 -> n x K x C.
fn pick(f: &Tensor, flat: &Tensor) -> Tensor {
    let size = f.size();
    let (n, c) = (size[0], size[1]);
    let k = flat.size()[1];
    f.flatten(2, 3).gather(2, &flat.unsqueeze(1).expand([n, c, k], false), false).transpose(1, 2)
}

/// `W[s, l, k] = exp(-D_kl) / sum_k' exp(-D_k'l)` for each sample `s`, with `D` the Euclidean
/// distance in cells between the drawn cells (D is symmetric, so this is a softmax over the last
/// dimension of `-D`). Carries no gradient.
fn cell_weights(cells: &Tensor, w: i64, kind: Kind) -> Tensor {
    let rows = cells.floor_divide_scalar(w).to_kind(kind);
    let cols = cells.remainder(w).to_kind(kind);
    let dr = rows.unsqueeze(2) - rows.unsqueeze(1);
    let dc = cols.unsqueeze(2) - cols.unsqueeze(1);
    let dist = (&dr * &dr + &dc * &dc).sqrt();
    dist.neg().softmax(2, kind)
}

/// DICL for samples with depth, as this rank's share.
///
/// `f_r`, `f_d`: n x C x h x w dense maps (RGB, depth; before normalisation) of this rank's samples
/// that have DICL anchors (samples with depth and a non-empty foreground); `cells`: n x P int64 flat
/// indices `row * w + col` drawn for them (see [`draw_cells`]; repeats allowed). Returns
/// `(r2d share, d2r share)`, each `(sum over this rank's P x n anchors) / global_anchors`, with
/// `global_anchors` = P x (samples with DICL anchors in the global batch).
///
/// With `u_k`, `v_k` the normalised RGB and depth features at cell `p_k` and `W` as in the method page,
/// the loss of RGB anchor `l` is `-sum_k W_kl log softmax_k(v_k . u_l / tau)` (r2d); d2r swaps u and v.
/// Only the drawn cells are read: whatever the rest of the maps holds never reaches the loss.
/// Without anchors (n = 0, P = 0 or `global_anchors` = 0) both shares are exactly 0 with no graph.
pub fn dicl_share(f_r: &Tensor, f_d: &Tensor, cells: &Tensor, tau: f64, global_anchors: usize) -> (Tensor, Tensor) {
    let (kind, device) = (f_r.kind(), f_r.device());
    let size = f_r.size();
    debug_assert_eq!(size.len(), 4, "dense maps are n x C x h x w");
    debug_assert_eq!(f_d.size(), size, "RGB and depth maps must have the same shape");
    let (n, w) = (size[0], size[3]);
    let p = if cells.dim() == 2 { cells.size()[1] } else { 0 };
    if global_anchors == 0 || n == 0 || p == 0 {
        return (Tensor::zeros([], (kind, device)), Tensor::zeros([], (kind, device)));
    }
    debug_assert_eq!(cells.size(), [n, p], "cells are n x P");
    let cells = &cells.to_device(device);
    let u = normalize(&pick(f_r, cells)); // n x P x C
    let v = normalize(&pick(f_d, cells));
    let weights = cell_weights(cells, w, kind); // [s, l, k] = W_kl
    let sim = u.bmm(&v.transpose(1, 2)) / tau; // [s, l, k] = u_l . v_k / tau
    let count = global_anchors as f64;
    // r2d: anchor u_l, candidates v_k: softmax over k of sim[l, k].
    let r2d = -(&weights * sim.log_softmax(2, kind)).sum(kind) / count;
    // d2r: anchor v_l, candidates u_k: softmax over k of u_k . v_l = sim[k, l].
    let d2r = -(&weights * sim.transpose(1, 2).log_softmax(2, kind)).sum(kind) / count;
    (r2d, d2r)
}

/// Each joint's cell feature: `f` n x C x h x w, `cells` n x J x 2 int64 `(row, col)` (already inside
/// the map, see [`joint_cell`]) -> n x J x C, not normalised. Only the named cells are read.
pub fn cell_features(f: &Tensor, cells: &Tensor) -> Tensor {
    let w = f.size()[3];
    let cells = cells.to_device(f.device());
    let flat = cells.select(2, 0) * w + cells.select(2, 1);
    pick(f, &flat)
}

/// Source index of nearest-neighbour resizing, exactly as `torch.nn.functional.interpolate(mode =
/// "nearest")` computes it without a scale factor: the identity for equal sizes, `dst / 2` for a
/// doubling, else `min(floor(dst * (in / out)), in - 1)` with the scale and the product in f32.
/// (The f32 rounding matters: 26 -> 22 maps row 11 to 12, where exact arithmetic gives 13.)
fn nearest_source(dst: usize, input: usize, output: usize) -> usize {
    if output == input {
        dst
    } else if output == 2 * input {
        dst >> 1
    } else {
        let scale = input as f32 / output as f32;
        ((dst as f32 * scale).floor() as usize).min(input - 1)
    }
}

/// The foreground cells of a depth map: `depth > 0` (raw depth, before the mean is subtracted) resized
/// from `height x width` (row-major) to `h x w` by nearest sampling, exactly as
/// `interpolate(mode="nearest")` does. Row-major `h * w` flags.
///
/// Panics if `depth.len() != height * width`.
pub fn nearest_mask<T: Copy + PartialOrd + Default>(
    depth: &[T],
    height: usize,
    width: usize,
    h: usize,
    w: usize,
) -> Vec<bool> {
    assert_eq!(depth.len(), height * width, "depth map of {height} x {width} has {} values", depth.len());
    if height == 0 || width == 0 {
        return vec![false; h * w];
    }
    let zero = T::default();
    let cols: Vec<usize> = (0..w).map(|c| nearest_source(c, width, w)).collect();
    let mut mask = Vec::with_capacity(h * w);
    for r in 0..h {
        let src_row = &depth[nearest_source(r, height, h) * width..][..width];
        mask.extend(cols.iter().map(|&c| src_row[c] > zero));
    }
    mask
}

/// The seed of one sample's DICL cell draw: `mix(seed ^ mix(epoch ^ mix(slot ^ DICL_SALT)))` with
/// [`mix`] the splitmix64 finaliser and `DICL_SALT = 0x6469636c6469636c`, so it depends only on
/// `(seed, epoch, slot)` (not on the rank that loads the sample) and differs from the augmentation's
/// generator of the same slot.
pub fn dicl_seed(seed: u64, epoch: u64, slot: u64) -> u64 {
    mix(seed ^ mix(epoch ^ mix(slot ^ DICL_SALT)))
}

/// Draws `p` cells uniformly with replacement from the foreground (`fg`, row-major flags of the map):
/// flat indices `row * w + col`. The draw: the foreground's flat indices in increasing order, `F` of
/// them; draw `i` takes index `(x_i * F) >> 64` of that list, with `x_i` the i-th output (from 0) of
/// splitmix64 started at `rng_seed` (`x_i = mix(rng_seed + i * 0x9e3779b97f4a7c15)`). An empty
/// foreground gives an empty vector: that sample then has no DICL anchors.
pub fn draw_cells(fg: &[bool], p: usize, rng_seed: u64) -> Vec<i64> {
    let cells: Vec<i64> = fg.iter().enumerate().filter(|(_, f)| **f).map(|(i, _)| i as i64).collect();
    if cells.is_empty() {
        return Vec::new();
    }
    let mut s = Stream::new(rng_seed);
    (0..p).map(|_| cells[s.below(cells.len() as u64) as usize]).collect()
}

/// The cell of a joint at pixel position `(x, y)` (x = column, y = row) on an `h x w` map of the given
/// stride: `(floor(y / stride), floor(x / stride))`, each clamped into the map (a non-finite position
/// lands on an edge).
pub fn joint_cell(x: f32, y: f32, stride: i64, h: i64, w: i64) -> (i64, i64) {
    let cell = |v: f32, n: i64| ((v / stride as f32).floor() as i64).clamp(0, (n - 1).max(0));
    (cell(y, h), cell(x, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::testing::{close, grads};
    use tch::Device;

    const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

    #[test]
    fn dicl_matches_a_hand_computed_case() {
        // One sample, C = 2, a 1 x 2 map, cells [0, 1]: D = [[0, 1], [1, 0]], W = [[a, b], [b, a]],
        // a = e / (1 + e), b = 1 / (1 + e). u_0 = (1, 0), u_1 = (0, 1); v_0 = v_1 = (1, 0) (the maps hold
        // scaled copies: normalisation is part of the term). tau = 0.5.
        // r2d: every anchor sees equal logits over k: ln 2 each. d2r: anchor v_l sees logits (2, 0);
        // anchor 0 weighs them (a, b), anchor 1 (b, a): mean = ln(1 + e^2) - (a + b) = ln(1 + e^2) - 1.
        let f_r = Tensor::from_slice(&[3.0, 0.0, 0.0, 0.5]).view([1, 2, 1, 2]);
        let f_d = Tensor::from_slice(&[2.0, 7.0, 0.0, 0.0]).view([1, 2, 1, 2]);
        let cells = Tensor::from_slice(&[0i64, 1]).view([1, 2]);
        let (r2d, d2r) = dicl_share(&f_r, &f_d, &cells, 0.5, 2);
        let e = std::f64::consts::E;
        close(r2d.double_value(&[]), std::f64::consts::LN_2, 1e-12);
        close(d2r.double_value(&[]), (1.0 + e * e).ln() - 1.0, 1e-12);
    }

    #[test]
    fn dicl_shares_over_samples_add_up_and_never_read_undrawn_cells() {
        tch::manual_seed(11);
        let (n, c, h, w, p) = (5, 6, 3, 4, 7);
        let base_r = Tensor::randn([n, c, h, w], F64);
        let base_d = Tensor::randn([n, c, h, w], F64);
        let cells = Tensor::randint(h * w, [n, p], (Kind::Int64, Device::Cpu));
        let _ = cells.get(1).get(3).fill_(cells.get(1).get(0).int64_value(&[])); // a repeated cell
        // Poison every cell that was not drawn: a NaN there must not reach the loss or its gradient.
        let drawn = Tensor::zeros([n, h * w], (Kind::Bool, Device::Cpu)).scatter_value(1, &cells, 1);
        let undrawn = drawn.logical_not().view([n, 1, h, w]);
        let f_r = base_r.masked_fill(&undrawn, f64::NAN).set_requires_grad(true);
        let f_d = base_d.masked_fill(&undrawn, f64::NAN).set_requires_grad(true);
        let global = (n * p) as usize;
        let leaves = [f_r.shallow_clone(), f_d.shallow_clone()];
        let (r, d) = dicl_share(&f_r, &f_d, &cells, 0.07, global);
        let whole = &r + &d;
        let g_whole = grads(&whole, &leaves);
        assert!(whole.double_value(&[]).is_finite());
        for g in &g_whole {
            assert_eq!(g.isnan().any().int64_value(&[]), 0);
        }
        let mut sum = 0.0;
        let mut g_sum = [f_r.zeros_like(), f_d.zeros_like()];
        for part in [vec![0i64, 3], vec![1, 2, 4]] {
            let idx = Tensor::from_slice(&part);
            let (r, d) = dicl_share(
                &f_r.index_select(0, &idx),
                &f_d.index_select(0, &idx),
                &cells.index_select(0, &idx),
                0.07,
                global,
            );
            let share = r + d;
            sum += share.double_value(&[]);
            for (acc, g) in g_sum.iter_mut().zip(grads(&share, &leaves)) {
                *acc = &*acc + g;
            }
        }
        close(sum, whole.double_value(&[]), 1e-12);
        for (a, b) in g_sum.iter().zip(&g_whole) {
            assert!((a - b).abs().max().double_value(&[]) < 1e-12);
        }
    }

    #[test]
    fn dicl_without_anchors_is_exactly_zero() {
        let f = Tensor::zeros([0, 4, 2, 2], F64).set_requires_grad(true);
        let cells = Tensor::zeros([0, 3], (Kind::Int64, Device::Cpu));
        let (r, d) = dicl_share(&f, &f, &cells, 0.07, 0);
        assert_eq!((r.double_value(&[]), d.double_value(&[])), (0.0, 0.0));
        assert!(!r.requires_grad() && !d.requires_grad());
        // A rank without samples with depth while other ranks have some: still exactly 0.
        let (r, _) = dicl_share(&f, &f, &cells, 0.07, 12);
        assert_eq!(r.double_value(&[]), 0.0);
    }

    #[test]
    fn cell_features_pick_the_named_cells() {
        // n = 1, C = 2, 2 x 3 map; channel c at (row, col) holds 100 c + 10 row + col.
        let f = Tensor::from_slice(&[0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 100.0, 101.0, 102.0, 110.0, 111.0, 112.0])
            .view([1, 2, 2, 3]);
        let cells = Tensor::from_slice(&[1i64, 2, 0, 1, 1, 0]).view([1, 3, 2]);
        let got = Vec::<f64>::try_from(&cell_features(&f, &cells).reshape([-1])).expect("values");
        assert_eq!(got, [12.0, 112.0, 1.0, 101.0, 10.0, 110.0]);
    }

    #[test]
    fn nearest_mask_matches_torch_interpolate_nearest() {
        // 5 x 6 depth (u16): resized to 2 x 3 and to 3 x 4; expected values from
        // torch.nn.functional.interpolate(d[None, None], size=..., mode="nearest").
        #[rustfmt::skip]
        let d: [u16; 30] = [
            0, 1, 0, 0, 2, 0,
            0, 0, 3, 0, 0, 0,
            4, 0, 0, 0, 0, 5,
            0, 0, 0, 6, 0, 0,
            0, 7, 0, 0, 0, 0,
        ];
        assert_eq!(nearest_mask(&d, 5, 6, 2, 3), [false, false, true, true, false, false]);
        #[rustfmt::skip]
        assert_eq!(
            nearest_mask(&d, 5, 6, 3, 4),
            [false, true, false, true, false, false, false, false, false, false, true, false]
        );
        // f32 depth, upsampling by 2 (dst / 2).
        let m = nearest_mask(&[1.0f32, 0.0, -1.0, 2.0], 2, 2, 4, 4);
        assert_eq!(&m[..4], [true, true, false, false]);
        assert_eq!(&m[8..12], [false, false, true, true]);
        // The f32 rounding torch uses: 26 -> 22 maps output row 11 to input row 12 (exact: 13).
        let mut column = vec![0u16; 26];
        column[12] = 1;
        let m = nearest_mask(&column, 26, 1, 22, 1);
        assert_eq!(m.iter().position(|&x| x), Some(11));
    }

    #[test]
    fn draw_cells_is_deterministic_and_foreground_only() {
        let mut fg = vec![false; 40];
        for i in [3, 7, 8, 21, 39] {
            fg[i] = true;
        }
        let a = draw_cells(&fg, 400, 5);
        assert_eq!(a, draw_cells(&fg, 400, 5));
        assert_ne!(a, draw_cells(&fg, 400, 6));
        assert_eq!(a.len(), 400);
        assert!(a.iter().all(|&c| fg[c as usize]));
        for i in [3, 7, 8, 21, 39] {
            assert!(a.contains(&i), "cell {i} never drawn in 400 draws");
        }
        assert!(draw_cells(&[false; 9], 400, 5).is_empty());
    }

    #[test]
    fn dicl_seed_depends_on_every_part_and_differs_from_the_augmentation_seed() {
        let s = dicl_seed(1, 2, 3);
        assert_ne!(s, dicl_seed(0, 2, 3));
        assert_ne!(s, dicl_seed(1, 0, 3));
        assert_ne!(s, dicl_seed(1, 2, 4));
        // The augmentation generator's seed for the same (seed, epoch, slot) (data/src/augment.rs).
        assert_ne!(s, mix(1 ^ mix(2 ^ mix(3u64.wrapping_add(0xa5a5)))));
    }

    #[test]
    fn joint_cell_floors_and_clamps() {
        assert_eq!(joint_cell(13.9, 4.0, 4, 10, 10), (1, 3));
        assert_eq!(joint_cell(-0.5, 100.0, 4, 10, 10), (9, 0));
        assert_eq!(joint_cell(39.99, 40.0, 4, 10, 10), (9, 9));
        assert_eq!(joint_cell(f32::NAN, f32::INFINITY, 4, 10, 10), (9, 0));
    }
}
