//! Named tensor sets in safetensors files: reading and writing with the `__metadata__` string map, and
//! loading into existing variables with validation.
//!
//! A file whose tensors do not match the variables they are loaded into (missing, unexpected or
//! mis-shaped names) is refused with one error that names the file and lists every offending tensor with
//! its shapes. Element types may differ (a value is converted on copy: f32 weights load into an f64
//! model, an int64 counter into a float one).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Kind, Tensor};

/// The `__metadata__` string map of a safetensors file.
pub type Metadata = BTreeMap<String, String>;

/// At most this many names are listed per kind of mismatch; the rest are counted.
const LISTED: usize = 40;

fn dims(shape: &[i64]) -> String {
    let d: Vec<String> = shape.iter().map(i64::to_string).collect();
    format!("[{}]", d.join(", "))
}

fn list(out: &mut String, label: &str, items: &[String]) {
    if items.is_empty() {
        return;
    }
    let _ = write!(out, "\n  {label} ({}):", items.len());
    for item in items.iter().take(LISTED) {
        let _ = write!(out, "\n    {item}");
    }
    if items.len() > LISTED {
        let _ = write!(out, "\n    ... and {} more", items.len() - LISTED);
    }
}

/// Checks that `found` holds exactly the `expected` names with the expected shapes. The error (one for
/// all problems) starts with `what` and lists missing, unexpected and mis-shaped tensors by name.
pub fn check_names_and_shapes(
    what: &str,
    expected: &[(String, Vec<i64>)],
    found: &[(String, Tensor)],
) -> anyhow::Result<()> {
    let want: BTreeMap<&str, &[i64]> = expected.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
    let have: BTreeMap<&str, Vec<i64>> = found.iter().map(|(n, t)| (n.as_str(), t.size())).collect();
    let missing: Vec<String> =
        want.iter().filter(|(n, _)| !have.contains_key(*n)).map(|(n, s)| format!("{n} {}", dims(s))).collect();
    let extra: Vec<String> =
        have.iter().filter(|(n, _)| !want.contains_key(*n)).map(|(n, s)| format!("{n} {}", dims(s))).collect();
    let misshaped: Vec<String> = want
        .iter()
        .filter_map(|(n, s)| {
            let h = have.get(n)?;
            (h.as_slice() != *s).then(|| format!("{n}: expected {}, found {}", dims(s), dims(h)))
        })
        .collect();
    if missing.is_empty() && extra.is_empty() && misshaped.is_empty() {
        return Ok(());
    }
    let mut msg = format!(
        "{what}: {} missing, {} unexpected and {} mis-shaped tensors (expected {}, found {})",
        missing.len(),
        extra.len(),
        misshaped.len(),
        want.len(),
        have.len()
    );
    list(&mut msg, "missing", &missing);
    list(&mut msg, "unexpected", &extra);
    list(&mut msg, "mis-shaped", &misshaped);
    if let Some(hint) = prefix_hint(&want, &have) {
        let _ = write!(msg, "\n  {hint}");
    }
    anyhow::bail!(msg)
}

/// When every found name is an expected name under one extra prefix (a checkpoint given where an
/// exported encoder is expected), says so.
fn prefix_hint(want: &BTreeMap<&str, &[i64]>, have: &BTreeMap<&str, Vec<i64>>) -> Option<String> {
    if want.keys().any(|n| have.contains_key(n)) {
        return None;
    }
    let prefixes: BTreeSet<&str> = have
        .keys()
        .filter_map(|h| want.keys().find(|w| h.ends_with(&format!(".{w}"))).map(|w| &h[..h.len() - w.len()]))
        .collect();
    (prefixes.len() == 1 && !have.is_empty())
        .then(|| format!("the found names carry the prefix {:?}", prefixes.first().copied().unwrap_or_default()))
}

/// Names and shapes of some tensors (what [`check_names_and_shapes`] expects).
pub fn names_and_shapes(tensors: &[(String, Tensor)]) -> Vec<(String, Vec<i64>)> {
    tensors.iter().map(|(n, t)| (n.clone(), t.size())).collect()
}

/// The tensors whose names start with `prefix`, renamed without it (shallow copies).
pub fn strip_prefix(tensors: &[(String, Tensor)], prefix: &str) -> Vec<(String, Tensor)> {
    tensors.iter().filter_map(|(n, t)| n.strip_prefix(prefix).map(|s| (s.to_string(), t.shallow_clone()))).collect()
}

/// Copies `found` into the variables `vars` (same names and shapes, checked first; element types are
/// converted), without recording gradients.
pub fn copy_into(what: &str, vars: &[(String, Tensor)], found: &[(String, Tensor)]) -> anyhow::Result<()> {
    check_names_and_shapes(what, &names_and_shapes(vars), found)?;
    let by_name: HashMap<&str, &Tensor> = found.iter().map(|(n, t)| (n.as_str(), t)).collect();
    tch::no_grad(|| {
        for (name, var) in vars {
            if let Some(src) = by_name.get(name.as_str()) {
                let mut dst = var.shallow_clone();
                dst.f_copy_(src).with_context(|| format!("{what}: cannot copy {name}"))?;
            }
        }
        Ok(())
    })
}

/// Reads every tensor of a safetensors file, and its metadata (empty when it has none).
pub fn read(path: &Path) -> anyhow::Result<(Vec<(String, Tensor)>, Metadata)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e:?}", path.display()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: bad safetensors header: {e:?}", path.display()))?;
    let metadata: Metadata = header.metadata().clone().unwrap_or_default().into_iter().collect();
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let kind =
            Kind::try_from(view.dtype()).map_err(|e| anyhow::anyhow!("{}: tensor {name}: {e}", path.display()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .with_context(|| format!("{}: tensor {name}", path.display()))?;
        tensors.push((name, t));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((tensors, metadata))
}

/// Reads `path` and copies its tensors into `vars` (see [`copy_into`]); returns the file's metadata.
pub fn load_into(path: &Path, vars: &[(String, Tensor)]) -> anyhow::Result<Metadata> {
    let (found, metadata) = read(path)?;
    copy_into(&path.display().to_string(), vars, &found)?;
    Ok(metadata)
}

/// A tensor's bytes on the host, serialisable by the safetensors crate. The bytes are copied when
/// the view is made, where a failed copy is an error naming the tensor (the crate's `View::data`
/// cannot fail).
struct HostView {
    bytes: Vec<u8>,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl View for &HostView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (&self.bytes[..]).into()
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes named tensors (any device; copied to the CPU) and `metadata` as a safetensors file, through a
/// temporary file renamed into place.
pub fn write(path: &Path, tensors: &[(String, Tensor)], metadata: &Metadata) -> anyhow::Result<()> {
    let views = tensors
        .iter()
        .map(|(name, t)| {
            let tensor = t.detach().to_device(tch::Device::Cpu).contiguous();
            let dtype = Dtype::try_from(tensor.kind()).map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))?;
            let shape = tensor.size().iter().map(|&d| d as usize).collect();
            let mut bytes = vec![0u8; tensor.numel() * tensor.kind().elt_size_in_bytes()];
            tensor
                .f_copy_data_u8(&mut bytes, tensor.numel())
                .with_context(|| format!("tensor {name}: cannot copy its data to the host"))?;
            Ok((name.clone(), HostView { bytes, dtype, shape }))
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .with_context(|| format!("cannot write {}", path.display()))?;
    let info: Option<HashMap<String, String>> =
        (!metadata.is_empty()).then(|| metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    let bytes = safetensors::tensor::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), &info)
        .map_err(|e| anyhow::anyhow!("cannot serialise {}: {e:?}", path.display()))?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(&bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn t(shape: &[i64]) -> Tensor {
        Tensor::zeros(shape, (Kind::Float, Device::Cpu))
    }

    #[test]
    fn one_error_lists_every_mismatch() {
        let expected = vec![
            ("a.weight".to_string(), vec![2, 3]),
            ("b.weight".to_string(), vec![4]),
            ("c.bias".to_string(), vec![5]),
        ];
        let found =
            vec![("a.weight".to_string(), t(&[3, 2])), ("c.bias".to_string(), t(&[5])), ("zz".to_string(), t(&[1]))];
        let e = check_names_and_shapes("weights.safetensors", &expected, &found).expect_err("mismatch");
        let msg = format!("{e:#}");
        assert!(msg.starts_with("weights.safetensors: 1 missing, 1 unexpected and 1 mis-shaped"), "{msg}");
        assert!(msg.contains("b.weight [4]"), "{msg}");
        assert!(msg.contains("zz [1]"), "{msg}");
        assert!(msg.contains("a.weight: expected [2, 3], found [3, 2]"), "{msg}");
        assert!(!msg.contains("c.bias"), "{msg}");
        let ok = vec![
            ("a.weight".to_string(), t(&[2, 3])),
            ("b.weight".to_string(), t(&[4])),
            ("c.bias".to_string(), t(&[5])),
        ];
        check_names_and_shapes("w", &expected, &ok).expect("exact match");
        // A prefixed copy of the expected names is pointed out.
        let prefixed: Vec<(String, Tensor)> = ok.iter().map(|(n, x)| (format!("rgb.backbone.{n}"), x.copy())).collect();
        let msg = format!("{:#}", check_names_and_shapes("w", &expected, &prefixed).expect_err("prefixed"));
        assert!(msg.contains("prefix \"rgb.backbone.\""), "{msg}");
    }

    #[test]
    fn long_lists_are_cut() {
        let expected: Vec<(String, Vec<i64>)> = (0..100).map(|i| (format!("v{i:03}"), vec![1])).collect();
        let msg = format!("{:#}", check_names_and_shapes("f", &expected, &[]).expect_err("all missing"));
        assert!(msg.contains("missing (100):") && msg.contains("... and 60 more"), "{msg}");
    }

    #[test]
    fn write_read_round_trip_with_metadata_and_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.safetensors");
        let tensors = vec![
            ("x.weight".to_string(), Tensor::from_slice(&[1.5f32, -2.0, 3.25]).view([3, 1])),
            ("x.num_batches_tracked".to_string(), Tensor::from(7i64)),
            // A non-contiguous tensor is written by value.
            ("y".to_string(), Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0]).view([2, 2]).tr()),
        ];
        let mut meta = Metadata::new();
        meta.insert("backbone".into(), "hrnet_small".into());
        write(&path, &tensors, &meta).expect("write");
        let (back, m) = read(&path).expect("read");
        assert_eq!(m, meta);
        assert_eq!(
            back.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["x.num_batches_tracked", "x.weight", "y"]
        );
        assert_eq!(back[0].1.kind(), Kind::Int64);
        assert_eq!(back[0].1.int64_value(&[]), 7);
        assert!(back[1].1.equal(&tensors[0].1));
        assert!(back[2].1.equal(&tensors[2].1.contiguous()));
        // Safetensors written by tch (no metadata) read with an empty map.
        let plain = dir.path().join("plain.safetensors");
        Tensor::write_safetensors(&tensors[..1], &plain).expect("tch write");
        assert!(read(&plain).expect("read").1.is_empty());

        // Loading converts element types: an f64 variable, a float counter.
        let vars = vec![
            ("x.num_batches_tracked".to_string(), Tensor::zeros([], (Kind::Float, Device::Cpu))),
            ("x.weight".to_string(), Tensor::zeros([3, 1], (Kind::Double, Device::Cpu)).set_requires_grad(true)),
            ("y".to_string(), Tensor::zeros([2, 2], (Kind::Double, Device::Cpu))),
        ];
        load_into(&path, &vars).expect("load");
        assert_eq!(vars[0].1.double_value(&[]), 7.0);
        assert_eq!(vars[1].1.double_value(&[2, 0]), 3.25);
        assert!(vars[1].1.requires_grad());
        // A mismatch names the file.
        let e = load_into(&path, &vars[..2]).expect_err("extra tensor y");
        let msg = format!("{e:#}");
        assert!(msg.contains(&path.display().to_string()) && msg.contains("y [2, 2]"), "{msg}");
        let e = read(&dir.path().join("nope.safetensors")).expect_err("missing file");
        assert!(format!("{e:#}").contains("nope.safetensors"));
        std::fs::write(dir.path().join("junk.safetensors"), b"not safetensors").expect("junk");
        let e = read(&dir.path().join("junk.safetensors")).expect_err("junk");
        assert!(format!("{e:#}").contains("junk.safetensors: not a safetensors file"), "{e:#}");
    }
}
