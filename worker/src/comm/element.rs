//! `Element`: the element types the ring reduces (f32, f64, bf16), their codes on the wire, and the
//! reduction kernels the ring steps run.
//!
//! Rounding: a ring step computes `local + incoming` and rounds it to the element type once (f32 and f64
//! add natively; bf16 widens both to f32, adds, and rounds to nearest-even bf16). The last step of an
//! average also divides by the world size: f32 and f64 round the sum, then the quotient; bf16 keeps the
//! sum in f32, divides in f32 and rounds once to bf16. Chunk `c` is summed in ring order, starting at
//! rank `c + 1`: `((x[c+1] + x[c+2]) + ...) + x[c]` (indices mod W), then copied to every rank, so all
//! ranks hold the same bits.

use half::bf16;

/// An element type the ring can sum. `WIRE_CODE` travels in every record header so that ranks
/// reducing different types fail with a protocol error instead of adding garbage.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    /// Name for messages and logs.
    const DTYPE: &'static str;
    /// Stable code on the wire (1 f32, 2 f64, 3 bf16; 4 f16 reserved). 0 means raw bytes.
    const WIRE_CODE: u8;
    fn add(a: Self, b: Self) -> Self;
    /// `dst[i] = dst[i] + incoming[i]`, divided by `divisor` when given (see the module doc for rounding).
    fn reduce_in_place(dst: &mut [Self], incoming: &[Self], divisor: Option<usize>);
    /// `out[i] = local[i] + incoming[i]`, divided by `divisor` when given.
    fn reduce_into(out: &mut [Self], local: &[Self], incoming: &[Self], divisor: Option<usize>);
}

macro_rules! native_float {
    ($t:ty, $name:literal, $code:literal) => {
        impl Element for $t {
            const DTYPE: &'static str = $name;
            const WIRE_CODE: u8 = $code;

            fn add(a: Self, b: Self) -> Self {
                a + b
            }

            fn reduce_in_place(dst: &mut [Self], incoming: &[Self], divisor: Option<usize>) {
                debug_assert_eq!(dst.len(), incoming.len());
                match divisor {
                    None => dst.iter_mut().zip(incoming).for_each(|(d, &x)| *d += x),
                    Some(w) => {
                        let w = w as $t;
                        dst.iter_mut().zip(incoming).for_each(|(d, &x)| *d = (*d + x) / w);
                    }
                }
            }

            fn reduce_into(out: &mut [Self], local: &[Self], incoming: &[Self], divisor: Option<usize>) {
                debug_assert!(out.len() == local.len() && out.len() == incoming.len());
                let pairs = local.iter().zip(incoming);
                match divisor {
                    None => out.iter_mut().zip(pairs).for_each(|(o, (&a, &b))| *o = a + b),
                    Some(w) => {
                        let w = w as $t;
                        out.iter_mut().zip(pairs).for_each(|(o, (&a, &b))| *o = (a + b) / w);
                    }
                }
            }
        }
    };
}

native_float!(f32, "f32", 1);
native_float!(f64, "f64", 2);

/// bf16 to f32 is exact: the bf16 bits are the high half of the f32 bits.
#[inline(always)]
fn widen(x: bf16) -> f32 {
    f32::from_bits(u32::from(x.to_bits()) << 16)
}

/// f32 to bf16, rounding to nearest, ties to even (as libtorch and `half` do); NaN stays a quiet NaN.
/// Branch-free and without overflow checks, so the reduction loops vectorize.
#[inline(always)]
pub(crate) fn round_bf16(x: f32) -> bf16 {
    let bits = x.to_bits();
    // Cannot wrap: the largest non-NaN pattern is 0xFF80_0000 (-inf).
    let rounded = bits.wrapping_add(0x7FFF).wrapping_add((bits >> 16) & 1) >> 16;
    let quiet_nan = (bits >> 16) | 0x0040;
    bf16::from_bits(if x.is_nan() { quiet_nan } else { rounded } as u16)
}

impl Element for bf16 {
    const DTYPE: &'static str = "bf16";
    const WIRE_CODE: u8 = 3;

    fn add(a: Self, b: Self) -> Self {
        round_bf16(widen(a) + widen(b))
    }

    fn reduce_in_place(dst: &mut [Self], incoming: &[Self], divisor: Option<usize>) {
        debug_assert_eq!(dst.len(), incoming.len());
        match divisor {
            None => dst.iter_mut().zip(incoming).for_each(|(d, &x)| *d = round_bf16(widen(*d) + widen(x))),
            Some(w) => {
                let w = w as f32;
                dst.iter_mut().zip(incoming).for_each(|(d, &x)| *d = round_bf16((widen(*d) + widen(x)) / w));
            }
        }
    }

    fn reduce_into(out: &mut [Self], local: &[Self], incoming: &[Self], divisor: Option<usize>) {
        debug_assert!(out.len() == local.len() && out.len() == incoming.len());
        let pairs = local.iter().zip(incoming);
        match divisor {
            None => out.iter_mut().zip(pairs).for_each(|(o, (&a, &b))| *o = round_bf16(widen(a) + widen(b))),
            Some(w) => {
                let w = w as f32;
                out.iter_mut().zip(pairs).for_each(|(o, (&a, &b))| *o = round_bf16((widen(a) + widen(b)) / w));
            }
        }
    }
}

/// Name of a wire code, for error messages.
pub(crate) fn dtype_name(code: u8) -> String {
    match code {
        0 => "bytes".to_owned(),
        1 => "f32".to_owned(),
        2 => "f64".to_owned(),
        3 => "bf16".to_owned(),
        4 => "f16".to_owned(),
        c => format!("dtype code {c}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn bf16_rounding_matches_half(bits: u32) {
            let x = f32::from_bits(bits);
            let ours = round_bf16(x);
            let theirs = bf16::from_f32(x);
            if x.is_nan() {
                prop_assert!(ours.is_nan());
            } else {
                prop_assert_eq!(ours.to_bits(), theirs.to_bits(), "{:e}", x);
            }
            prop_assert_eq!(widen(theirs).to_bits(), theirs.to_f32().to_bits());
        }
    }

    #[test]
    fn bf16_rounding_matches_libtorch() {
        let values: Vec<f32> = crate::comm::testing::pseudo_random(9, 10_000)
            .into_iter()
            .enumerate()
            .map(|(i, x)| (x * 10f64.powi((i % 40) as i32 - 20)) as f32)
            .chain([0.0, -0.0, 1.0 + f32::EPSILON, f32::MAX, f32::MIN_POSITIVE, 3.0e38, f32::INFINITY])
            .collect();
        let torch = tch::Tensor::from_slice(&values).to_kind(tch::Kind::BFloat16);
        // (tch maps `half::bf16` to Kind::Half, so the bits are read as bytes.)
        let mut expected = vec![bf16::ZERO; values.len()];
        torch.copy_data_u8(bytemuck::cast_slice_mut(&mut expected), values.len());
        for (x, e) in values.iter().zip(&expected) {
            assert_eq!(round_bf16(*x).to_bits(), e.to_bits(), "{x:e}");
        }
    }

    #[test]
    fn kernels_round_once_per_step_and_divide_at_the_end() {
        let a = [bf16::from_f32(1.0), bf16::from_f32(256.0)];
        let b = [bf16::from_f32(1.0 / 512.0), bf16::from_f32(1.0)];
        let mut out = [bf16::ZERO; 2];
        bf16::reduce_into(&mut out, &a, &b, None);
        // 1 + 2^-9 rounds to 1 in bf16 (8 bits of mantissa); 257 rounds to 256 (ties to even).
        assert_eq!(out.map(|x| x.to_f32()), [1.0, 256.0]);
        let mut dst = [3.0f32, 5.0];
        f32::reduce_in_place(&mut dst, &[1.0, 1.0], Some(2));
        assert_eq!(dst, [2.0, 3.0]);
        let mut dst = a;
        bf16::reduce_in_place(&mut dst, &b, Some(3));
        assert_eq!(
            dst.map(|x| x.to_bits()),
            [round_bf16(1.001_953_1 / 3.0).to_bits(), round_bf16(257.0 / 3.0).to_bits()]
        );
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore = "measurement: CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo test -p hcmoco-worker --lib kernel_speed -- --ignored --nocapture"]
    fn kernel_speed() {
        const N: usize = 1 << 20;
        fn time<T: Element>(name: &str, one: T) {
            let mut dst = vec![one; N];
            let inc = vec![one; N];
            let mut out = vec![one; N];
            let start = std::time::Instant::now();
            for _ in 0..20 {
                T::reduce_in_place(&mut dst, &inc, None);
                T::reduce_into(&mut out, &dst, &inc, None);
            }
            let per = start.elapsed().as_secs_f64() / 40.0 / N as f64;
            println!(
                "{name}: {:.2} ns per element, {:.1} GB/s of output",
                per * 1e9,
                size_of::<T>() as f64 / per / 1e9
            );
        }
        time("f32", 1.0f32);
        time("f64", 1.0f64);
        time("bf16", bf16::ONE);
    }
}
