//! The deterministic random stream behind the loss's draws (DICL cells, memory-bank negatives, bank
//! initialisation): splitmix64, built on [`hcmoco_data::augment::mix`], so a draw depends only on its
//! seed and can be reproduced anywhere (another rank, another language) from the documented recipe.

use hcmoco_data::augment::mix;

/// The splitmix64 increment (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64: output `i` (from 0) is `mix(seed + i * GOLDEN)`.
#[derive(Debug, Clone)]
pub(crate) struct Stream {
    state: u64,
}

impl Stream {
    pub(crate) fn new(seed: u64) -> Stream {
        Stream { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let x = mix(self.state);
        self.state = self.state.wrapping_add(GOLDEN);
        x
    }

    /// A uniform integer in `0..n` (`n > 0`): the high 64 bits of `next * n` (Lemire's multiply-shift,
    /// without the rejection step: the bias is below `n / 2^64`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A uniform float in the half-open interval (0, 1], from the top 53 bits.
    pub(crate) fn unit_open0(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Two independent standard normal values (Box-Muller).
    pub(crate) fn normal_pair(&mut self) -> (f64, f64) {
        let r = (-2.0 * self.unit_open0().ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * self.unit_open0();
        (r * theta.cos(), r * theta.sin())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_splitmix64_and_draws_stay_in_range() {
        let mut s = Stream::new(7);
        assert_eq!(s.next_u64(), mix(7));
        assert_eq!(s.next_u64(), mix(7u64.wrapping_add(GOLDEN)));
        let mut counts = [0usize; 5];
        for _ in 0..5000 {
            counts[s.below(5) as usize] += 1;
        }
        // Each of 5 values has probability 1/5: 1000 expected, far outside +-200 would be a broken draw.
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
        for _ in 0..1000 {
            let u = s.unit_open0();
            assert!(u > 0.0 && u <= 1.0);
        }
    }
}
