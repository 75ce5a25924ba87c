//! Python's `webdataset` package reads our shards as they are: same keys, same members, same decoded
//! depth, part labels, keypoints and (PNG exactly, JPEG within decoder tolerance) RGB as our reader.
//!
//! Needs the venv that `scripts/setup.sh` builds (torch, numpy, webdataset, pillow): `$HCMOCO_VENV`,
//! or `~/.cache/hcmoco/venv-torch-2.11.0`. Without it the test fails and says so.

use std::path::{Path, PathBuf};
use std::process::Command;

use hcmoco_data::{Dataset, KeypointLayout, Sample, SynthConfig};
use hcmoco_tests::venv_python;
use serde_json::Value;

fn u64s(v: &Value, what: &str) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: not an array"))
        .iter()
        .map(|x| x.as_u64().unwrap_or_else(|| panic!("{what}: not an integer: {x}")))
        .collect()
}

fn size(v: &Value) -> (u32, u32) {
    let dim = |k: &str| v[k].as_u64().and_then(|n| u32::try_from(n).ok()).expect("image size");
    (dim("width"), dim("height"))
}

/// Compares one sample as Python saw it with what our reader returns.
fn check(py: &Value, ours: &Sample, shard: &Path, jpeg: bool) {
    let key = &ours.key;
    assert_eq!(py["key"], Value::from(key.as_str()), "key order differs in {}", shard.display());
    assert_eq!(py["url"].as_str().map(Path::new), Some(shard), "{key}: url");

    let mut want = vec![if jpeg { "rgb.jpg" } else { "rgb.png" }, "kp2d.json", "meta.json"];
    if ours.depth.is_some() {
        want.push("depth.png");
    }
    if ours.parts.is_some() {
        want.push("parts.png");
    }
    want.sort_unstable();
    let members: Vec<&str> = py["members"].as_array().expect("members").iter().filter_map(Value::as_str).collect();
    assert_eq!(members, want, "{key}: members");

    // RGB: identical for PNG; PIL's libjpeg and our zune-jpeg may round differently for JPEG.
    let rgb = &py["rgb"];
    assert_eq!(size(rgb), (ours.rgb.width, ours.rgb.height), "{key}: rgb size");
    let py_rgb = u64s(&rgb["data"], "rgb");
    let ours_rgb: Vec<u64> = ours.rgb.data.iter().map(|&b| u64::from(b)).collect();
    if jpeg {
        assert_eq!(py_rgb.len(), ours_rgb.len(), "{key}: rgb length");
        let diff: Vec<u64> = py_rgb.iter().zip(&ours_rgb).map(|(a, b)| a.abs_diff(*b)).collect();
        let mae = diff.iter().sum::<u64>() as f64 / diff.len() as f64;
        let max = diff.iter().copied().max().unwrap_or(0);
        assert!(mae < 1.0 && max <= 8, "{key}: PIL and our jpeg decoder differ: mean {mae}, max {max}");
    } else {
        assert_eq!(py_rgb, ours_rgb, "{key}: rgb pixels");
    }

    match (&ours.depth, &py["depth"]) {
        (None, Value::Null) => {}
        (Some(d), v) => {
            assert_eq!(size(v), (d.width, d.height), "{key}: depth size");
            let ours_d: Vec<u64> = d.data.iter().map(|&x| u64::from(x)).collect();
            assert_eq!(u64s(&v["data"], "depth"), ours_d, "{key}: depth values");
        }
        (None, v) => panic!("{key}: python sees depth {v:.80}, we do not"),
    }
    match (&ours.parts, &py["parts"]) {
        (None, Value::Null) => {}
        (Some(p), v) => {
            assert_eq!(size(v), (p.width, p.height), "{key}: parts size");
            let ours_p: Vec<u64> = p.data.iter().map(|&x| u64::from(x)).collect();
            assert_eq!(u64s(&v["data"], "parts"), ours_p, "{key}: part labels");
        }
        (None, v) => panic!("{key}: python sees parts {v:.80}, we do not"),
    }

    let kp = &py["kp2d"];
    assert_eq!(kp["layout"], Value::from(ours.layout.as_str()), "{key}: layout");
    let joints = kp["joints"].as_array().expect("joints");
    assert_eq!(joints.len(), ours.joints.len(), "{key}: joint count");
    for (i, (pj, j)) in joints.iter().zip(&ours.joints).enumerate() {
        let x = pj[0].as_f64().expect("x") as f32;
        let y = pj[1].as_f64().expect("y") as f32;
        let v = pj[2].as_u64().expect("v");
        assert_eq!(
            (x.to_bits(), y.to_bits(), v),
            (j.x.to_bits(), j.y.to_bits(), u64::from(j.visible)),
            "{key}: joint {i}"
        );
    }
    assert_eq!(py["meta"]["key"], Value::from(key.as_str()), "{key}: meta key");
    assert_eq!(py["meta"]["has_depth"], Value::from(ours.depth.is_some()), "{key}: meta has_depth");
}

#[test]
fn python_webdataset_reads_our_shards() {
    let python = venv_python();
    let tmp = tempfile::tempdir().expect("tempdir");
    // Two datasets of two shards each: PNG RGB and JPEG RGB (quality 90); about half with depth, all
    // with part labels.
    let base = SynthConfig {
        samples: 6,
        image_size: 24,
        depth_fraction: 0.5,
        shard_size: 3,
        layout: KeypointLayout::Mpii16,
        ..SynthConfig::default()
    };
    let datasets = [
        (tmp.path().join("png"), SynthConfig { seed: 1, ..base.clone() }),
        (tmp.path().join("jpeg"), SynthConfig { seed: 2, rgb_jpeg_quality: Some(90), ..base }),
    ];
    let mut expected: Vec<(PathBuf, Sample, bool)> = Vec::new();
    for (dir, cfg) in &datasets {
        hcmoco_data::generate(cfg, dir).expect("generate");
        let ds = Dataset::open(dir.join("manifest.json")).expect("open");
        assert!(ds.manifest().modalities.iter().any(|m| m == "parts"));
        for g in 0..ds.len() {
            let (shard, _) = ds.locate(g).expect("locate");
            let path = ds.shard_path(shard).expect("shard path").to_path_buf();
            expected.push((path, ds.get(g).expect("our reader"), cfg.rgb_jpeg_quality.is_some()));
        }
    }
    let with_depth = expected.iter().filter(|(_, s, _)| s.depth.is_some()).count();
    assert!(with_depth > 0 && with_depth < expected.len(), "want a mix of depth and no depth: {with_depth}");

    let mut shards: Vec<&PathBuf> = expected.iter().map(|(p, _, _)| p).collect();
    shards.dedup();
    assert_eq!(shards.len(), 4);
    let script = hcmoco_tests::crate_file("python/read_webdataset.py");
    let out = Command::new(&python).arg(&script).args(&shards).output().expect("run python");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() != Some(2),
        "python packages missing (install with scripts/setup.sh, which adds webdataset and pillow to {}): {stderr}",
        python.display()
    );
    assert!(out.status.success(), "{} failed ({}): {stderr}", script.display(), out.status);

    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let seen: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(seen.len(), expected.len(), "webdataset saw {} samples, we have {}", seen.len(), expected.len());
    for (py, (shard, ours, jpeg)) in seen.iter().zip(&expected) {
        check(py, ours, shard, *jpeg);
    }
}
