//! Planar homographies: normalised DLT fit (least squares over all point pairs), apply, invert.

/// A point correspondence `(source, destination)`.
pub type PointPair = ((f64, f64), (f64, f64));

/// A 3x3 homography, row-major, mapping `(x, y, 1)` to homogeneous coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Homography(pub [[f64; 3]; 3]);

impl Homography {
    pub const IDENTITY: Homography = Homography([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]);

    /// Maps a point; `None` when it maps to infinity.
    pub fn apply(&self, x: f64, y: f64) -> Option<(f64, f64)> {
        let m = &self.0;
        let w = m[2][0] * x + m[2][1] * y + m[2][2];
        if w.abs() < 1e-12 {
            return None;
        }
        Some(((m[0][0] * x + m[0][1] * y + m[0][2]) / w, (m[1][0] * x + m[1][1] * y + m[1][2]) / w))
    }

    /// The inverse, or `None` when singular.
    pub fn inverse(&self) -> Option<Homography> {
        let m = &self.0;
        let c = |r0: usize, r1: usize, c0: usize, c1: usize| m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
        let adj = [
            [c(1, 2, 1, 2), -c(0, 2, 1, 2), c(0, 1, 1, 2)],
            [-c(1, 2, 0, 2), c(0, 2, 0, 2), -c(0, 1, 0, 2)],
            [c(1, 2, 0, 1), -c(0, 2, 0, 1), c(0, 1, 0, 1)],
        ];
        let det = m[0][0] * adj[0][0] + m[0][1] * adj[1][0] + m[0][2] * adj[2][0];
        if !det.is_finite() || det.abs() < 1e-15 {
            return None;
        }
        Some(Homography(adj.map(|row| row.map(|v| v / det))))
    }

    fn mul(&self, o: &Homography) -> Homography {
        let mut r = [[0.0; 3]; 3];
        for (i, row) in r.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (0..3).map(|k| self.0[i][k] * o.0[k][j]).sum();
            }
        }
        Homography(r)
    }

    /// Fits `dst ~ H src` by the normalised DLT (Hartley): both point sets are shifted to their
    /// centroid and scaled to mean distance sqrt(2), `H` is the right singular vector of the stacked
    /// 2n x 9 system with the smallest singular value (eigenvector of `A^T A`, Jacobi), then
    /// denormalised and scaled so `H[2][2] = 1` where possible. Needs at least 4 pairs not all on a
    /// line; `None` otherwise.
    pub fn fit(pairs: &[PointPair]) -> Option<Homography> {
        let pairs: Vec<_> =
            pairs.iter().copied().filter(|((a, b), (c, d))| [a, b, c, d].iter().all(|v| v.is_finite())).collect();
        if pairs.len() < 4 {
            return None;
        }
        let ts = normaliser(pairs.iter().map(|p| p.0))?;
        let td = normaliser(pairs.iter().map(|p| p.1))?;
        let mut ata = [[0.0f64; 9]; 9];
        for &((x, y), (u, v)) in &pairs {
            let (x, y) = ts.apply(x, y)?;
            let (u, v) = td.apply(u, v)?;
            let rows = [[-x, -y, -1.0, 0.0, 0.0, 0.0, u * x, u * y, u], [0.0, 0.0, 0.0, -x, -y, -1.0, v * x, v * y, v]];
            for r in &rows {
                for i in 0..9 {
                    for j in 0..9 {
                        ata[i][j] += r[i] * r[j];
                    }
                }
            }
        }
        let (values, vectors) = jacobi_eigen(ata);
        let mut order: Vec<usize> = (0..9).collect();
        order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
        // a unique solution: the second-smallest eigenvalue must be clearly above the smallest
        let (l0, l1) = (values[order[0]], values[order[1]]);
        if l1.is_nan() || l1 <= 1e-9 * values[order[8]].max(1e-300) || l1 <= l0 {
            return None;
        }
        let h = vectors[order[0]];
        let hn = Homography([[h[0], h[1], h[2]], [h[3], h[4], h[5]], [h[6], h[7], h[8]]]);
        let mut out = td.inverse()?.mul(&hn).mul(&ts);
        let s = out.0[2][2];
        let s = if s.abs() > 1e-12 { s } else { out.0.iter().flatten().map(|v| v.abs()).fold(0.0, f64::max) };
        if s == 0.0 || !s.is_finite() {
            return None;
        }
        for v in out.0.iter_mut().flatten() {
            *v /= s;
        }
        out.0.iter().flatten().all(|v| v.is_finite()).then_some(out)
    }
}

/// The similarity moving the points' centroid to 0 and their mean distance to sqrt(2).
fn normaliser(points: impl Iterator<Item = (f64, f64)> + Clone) -> Option<Homography> {
    let n = points.clone().count() as f64;
    let (sx, sy) = points.clone().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (cx, cy) = (sx / n, sy / n);
    let mean = points.map(|(x, y)| ((x - cx).powi(2) + (y - cy).powi(2)).sqrt()).sum::<f64>() / n;
    if mean.is_nan() || mean <= 1e-12 {
        return None;
    }
    let s = std::f64::consts::SQRT_2 / mean;
    Some(Homography([[s, 0.0, -s * cx], [0.0, s, -s * cy], [0.0, 0.0, 1.0]]))
}

/// Eigen-decomposition of a symmetric 9x9 matrix by cyclic Jacobi rotations: (eigenvalues,
/// eigenvectors as rows).
#[allow(clippy::needless_range_loop)] // the rotation reads two entries of each row and column
fn jacobi_eigen(mut a: [[f64; 9]; 9]) -> ([f64; 9], [[f64; 9]; 9]) {
    const N: usize = 9;
    let mut v = [[0.0f64; N]; N];
    for (i, row) in v.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..N)
            .flat_map(|i| (0..N).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        let total: f64 = a.iter().flatten().map(|x| x * x).sum();
        if off <= 1e-30 * total.max(1e-300) {
            break;
        }
        for p in 0..N {
            for q in p + 1..N {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..N {
                    let (akp, akq) = (a[k][p], a[k][q]);
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }
                for k in 0..N {
                    let (apk, aqk) = (a[p][k], a[q][k]);
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
                for row in v.iter_mut() {
                    let (vp, vq) = (row[p], row[q]);
                    row[p] = c * vp - s * vq;
                    row[q] = s * vp + c * vq;
                }
            }
        }
    }
    let values = std::array::from_fn(|i| a[i][i]);
    // columns of v are the eigenvectors
    let vectors = std::array::from_fn(|i| std::array::from_fn(|k| v[k][i]));
    (values, vectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_a_known_homography() {
        let h = Homography([[0.27, 0.01, 30.0], [-0.005, 0.26, 12.0], [1e-5, -2e-5, 1.0]]);
        let src: Vec<(f64, f64)> = (0..25)
            .map(|i| (200.0 + 61.0 * (i % 5) as f64 + (i * i % 7) as f64, 100.0 + 150.0 * (i / 5) as f64))
            .collect();
        let pairs: Vec<_> = src.iter().map(|&(x, y)| ((x, y), h.apply(x, y).expect("finite"))).collect();
        let fit = Homography::fit(&pairs).expect("fit");
        for &((x, y), (u, v)) in &pairs {
            let (a, b) = fit.apply(x, y).expect("finite");
            assert!((a - u).abs() < 1e-6 && (b - v).abs() < 1e-6, "({a}, {b}) vs ({u}, {v})");
        }
        let inv = fit.inverse().expect("invertible");
        let (x, y) = inv.apply(pairs[7].1.0, pairs[7].1.1).expect("finite");
        assert!((x - pairs[7].0.0).abs() < 1e-6 && (y - pairs[7].0.1).abs() < 1e-6);
    }

    #[test]
    fn degenerate_inputs_are_refused() {
        let line: Vec<_> = (0..10).map(|i| ((i as f64, 2.0 * i as f64), (i as f64, i as f64))).collect();
        assert!(Homography::fit(&line).is_none());
        assert!(Homography::fit(&line[..3]).is_none());
    }
}
