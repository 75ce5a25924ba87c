//! `TensorMeta`: the kind and shape that travel in front of tensor data in `all_gather_cat` and
//! `broadcast`, so receivers can rebuild the tensor and check that ranks agree.
//!
//! Layout: version u8 | kind u8 | ndim u8 | reserved [u8; 5] | dims i64 LE x ndim | data (row-major,
//! host byte order).

use tch::{Kind, Tensor};

const META_VERSION: u8 = 1;
const FIXED_LEN: usize = 8;
/// More dimensions than any tensor here has; bounds what a corrupt header can announce.
const MAX_DIMS: usize = 16;

/// Stable wire codes of the kinds whose bytes can travel as they are.
fn kind_code(kind: Kind) -> Option<u8> {
    Some(match kind {
        Kind::Uint8 => 1,
        Kind::Int8 => 2,
        Kind::Int16 => 3,
        Kind::Int => 4,
        Kind::Int64 => 5,
        Kind::Half => 6,
        Kind::Float => 7,
        Kind::Double => 8,
        Kind::Bool => 9,
        Kind::BFloat16 => 10,
        _ => return None,
    })
}

fn kind_from_code(code: u8) -> Option<Kind> {
    Some(match code {
        1 => Kind::Uint8,
        2 => Kind::Int8,
        3 => Kind::Int16,
        4 => Kind::Int,
        5 => Kind::Int64,
        6 => Kind::Half,
        7 => Kind::Float,
        8 => Kind::Double,
        9 => Kind::Bool,
        10 => Kind::BFloat16,
        _ => return None,
    })
}

/// Whether tensors of this kind can be gathered and broadcast.
pub(crate) fn is_transferable(kind: Kind) -> bool {
    kind_code(kind).is_some()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TensorMeta {
    pub kind: Kind,
    pub dims: Vec<i64>,
}

impl TensorMeta {
    /// Number of data bytes that follow the header.
    pub fn data_len(&self) -> Option<usize> {
        self.dims
            .iter()
            .try_fold(self.kind.elt_size_in_bytes(), |acc, &d| usize::try_from(d).ok().and_then(|d| acc.checked_mul(d)))
    }

    /// Header followed by the tensor's data (made contiguous by libtorch while copying).
    /// The caller has checked that the kind is transferable and that `t` is on the CPU.
    pub fn encode_tensor(t: &Tensor) -> Result<Vec<u8>, String> {
        let meta = TensorMeta { kind: t.kind(), dims: t.size() };
        let code = kind_code(meta.kind).ok_or_else(|| format!("kind {:?} cannot be transferred", meta.kind))?;
        if meta.dims.len() > MAX_DIMS {
            return Err(format!("{} dimensions, at most {MAX_DIMS} supported", meta.dims.len()));
        }
        let data_len = meta.data_len().ok_or_else(|| format!("shape {:?} too large", meta.dims))?;
        let mut out = Vec::with_capacity(FIXED_LEN + 8 * meta.dims.len() + data_len);
        out.extend_from_slice(&[META_VERSION, code, meta.dims.len() as u8, 0, 0, 0, 0, 0]);
        for d in &meta.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        let start = out.len();
        out.resize(start + data_len, 0);
        t.f_copy_data_u8(&mut out[start..], t.numel()).map_err(|e| format!("copying tensor data failed: {e}"))?;
        Ok(out)
    }

    /// Splits a message into its header and its data, checking that the data length matches.
    pub fn decode(bytes: &[u8]) -> Result<(TensorMeta, &[u8]), String> {
        if bytes.len() < FIXED_LEN {
            return Err(format!("tensor message of {} bytes is shorter than its header", bytes.len()));
        }
        if bytes[0] != META_VERSION {
            return Err(format!("tensor header version {}, expected {META_VERSION}", bytes[0]));
        }
        let kind = kind_from_code(bytes[1]).ok_or_else(|| format!("unknown kind code {}", bytes[1]))?;
        let ndim = usize::from(bytes[2]);
        if ndim > MAX_DIMS {
            return Err(format!("{ndim} dimensions, at most {MAX_DIMS} supported"));
        }
        let dims_end = FIXED_LEN + 8 * ndim;
        if bytes.len() < dims_end {
            return Err(format!("tensor message of {} bytes is shorter than its {ndim} dims", bytes.len()));
        }
        let dims: Vec<i64> = bytes[FIXED_LEN..dims_end]
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                i64::from_le_bytes(a)
            })
            .collect();
        let meta = TensorMeta { kind, dims };
        let data = &bytes[dims_end..];
        match meta.data_len() {
            Some(n) if n == data.len() => Ok((meta, data)),
            Some(n) => Err(format!("shape {:?} {:?} needs {n} data bytes, got {}", meta.dims, meta.kind, data.len())),
            None => Err(format!("invalid shape {:?}", meta.dims)),
        }
    }

    /// Rebuilds a tensor from data checked by `decode`.
    pub fn to_tensor(&self, data: &[u8]) -> Result<Tensor, tch::TchError> {
        Tensor::f_from_data_size(data, &self.dims, self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(dims in proptest::collection::vec(0i64..4, 0..4), double: bool) {
            let kind = if double { Kind::Double } else { Kind::Float };
            let numel: i64 = dims.iter().product();
            let t = Tensor::arange(numel, (kind, tch::Device::Cpu)).reshape(dims.as_slice());
            let bytes = TensorMeta::encode_tensor(&t).expect("encode");
            let (meta, data) = TensorMeta::decode(&bytes).expect("decode");
            prop_assert_eq!(&meta.dims, &dims);
            prop_assert_eq!(meta.kind, kind);
            let back = meta.to_tensor(data).expect("rebuild");
            prop_assert!(back.equal(&t));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = TensorMeta::decode(&bytes);
        }
    }

    #[test]
    fn decode_rejects_truncated_data() {
        let t = Tensor::from_slice(&[1i64, 2, 3]);
        let bytes = TensorMeta::encode_tensor(&t).expect("encode");
        let err = TensorMeta::decode(&bytes[..bytes.len() - 1]).expect_err("truncated");
        assert!(err.contains("needs 24 data bytes, got 23"), "{err}");
    }

    #[test]
    fn non_contiguous_tensors_travel_in_logical_order() {
        let t = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([2, 3]).tr();
        let bytes = TensorMeta::encode_tensor(&t).expect("encode");
        let (meta, data) = TensorMeta::decode(&bytes).expect("decode");
        assert!(meta.to_tensor(data).expect("rebuild").equal(&t));
    }
}
