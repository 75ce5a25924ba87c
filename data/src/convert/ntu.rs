//! NTU RGB+D style folders -> person-centred RGB + depth + keypoint samples (MPII-16 or COCO-13).
//!
//! Input under `root`: `skeleton/<name>.skeleton` (NTU text format: frame count; per frame a body
//! count; per body a line of 10 body-info values, a joint-count line (25), then 25 lines of
//! `x y z depthX depthY colorX colorY orientationW X Y Z trackingState`), `rgb/<name>.png|jpg` and
//! `depth/<name>.png` (masked 16-bit depth in millimetres, background 0). Each sample uses the FIRST
//! frame and its FIRST body (the RGB and depth images are that frame); a file whose first frame has
//! no body is skipped (`"no body in first frame"`).
//!
//! Registration: per camera, a homography colour -> depth is fitted ([`Homography::fit`], normalised
//! DLT, least squares) over the `(colorX, colorY) -> (depthX, depthY)` pairs of every tracked joint
//! (`trackingState >= 1`) of every body in every frame of that camera's files. The camera is the `C`
//! field of the NTU name `SsssCcccPpppRrrrAaaa` (e.g. `C002`); a name that does not match is fitted on
//! its own. RGB is warped into the depth grid (bilinear; outside the colour image = black).
//! Keypoints come from `depthX/depthY` as they are; labelled = `trackingState >= 1`. Person box: the
//! labelled joints inside the depth frame (fallback: the depth foreground), then `margin`; the same
//! crop and resize apply to RGB, depth and keypoints. Key `ntu/<name>`.
//!
//! Kinect v2 joints used (0 SpineBase, 2 Neck, 3 Head, 4-6 left shoulder/elbow/wrist, 8-10 right,
//! 12-14 left hip/knee/ankle, 16-18 right, 20 SpineShoulder):
//! - MPII-16: r_ankle 18, r_knee 17, r_hip 16, l_hip 12, l_knee 13, l_ankle 14, pelvis = SpineBase 0,
//!   thorax = SpineShoulder 20, upper_neck = Neck 2, head_top = Head 3, r_wrist 10, r_elbow 9,
//!   r_shoulder 8, l_shoulder 4, l_elbow 5, l_wrist 6.
//! - COCO-13: l_ankle 14, l_knee 13, l_hip 12, r_hip 16, r_knee 17, r_ankle 18, head = Head 3,
//!   l_wrist 6, l_elbow 5, l_shoulder 4, r_shoulder 8, r_elbow 9, r_wrist 10.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::homography::{Homography, PointPair};
use super::{BoxF, ConvertOptions, ConvertReport, Sink, bad_input, bilinear, crop_box, key_part, read_depth, read_rgb};
use crate::error::DataError;
use crate::layout::KeypointLayout;
use crate::sample::{DepthImage, RgbImage, Sample};

/// Kinect v2 index of each MPII-16 joint.
pub const KINECT_TO_MPII16: [usize; 16] = [18, 17, 16, 12, 13, 14, 0, 20, 2, 3, 10, 9, 8, 4, 5, 6];
/// Kinect v2 index of each COCO-13 joint.
pub const KINECT_TO_COCO13: [usize; 13] = [14, 13, 12, 16, 17, 18, 3, 6, 5, 4, 8, 9, 10];
/// Joints per body in the NTU format.
pub const KINECT_JOINTS: usize = 25;

/// One joint of a `.skeleton` file (the fields we use).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KinectJoint {
    pub depth: (f64, f64),
    pub color: (f64, f64),
    pub tracking: u8,
}

/// A parsed `.skeleton` file: per frame, per body, 25 joints.
#[derive(Debug, Clone, PartialEq)]
pub struct Skeleton {
    pub frames: Vec<Vec<Vec<KinectJoint>>>,
}

/// Parses a `.skeleton` file; errors name the file and the line.
pub fn parse_skeleton(path: &Path) -> Result<Skeleton, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty());
    let total_lines = text.lines().count();
    let mut next = |what: &str| -> Result<(usize, Vec<&str>), DataError> {
        match lines.next() {
            Some((n, l)) => Ok((n, l.split_whitespace().collect())),
            None => Err(bad_input(path, format!("cut short after line {total_lines}: expected {what}"))),
        }
    };
    let count = |n: usize, v: &[&str], what: &str| -> Result<usize, DataError> {
        match v {
            [one] => one.parse().map_err(|_| bad_input(path, format!("line {n}: expected {what}, found {one:?}"))),
            _ => Err(bad_input(path, format!("line {n}: expected {what} (one integer), found {} values", v.len()))),
        }
    };
    let (n, v) = next("the frame count")?;
    let n_frames = count(n, &v, "the frame count")?;
    let mut frames = Vec::with_capacity(n_frames.min(10_000));
    for f in 0..n_frames {
        let (n, v) = next(&format!("the body count of frame {f}"))?;
        let n_bodies = count(n, &v, "a body count")?;
        let mut bodies = Vec::with_capacity(n_bodies.min(16));
        for b in 0..n_bodies {
            let (n, v) = next(&format!("the body-info line of frame {f} body {b}"))?;
            if v.len() != 10 {
                return Err(bad_input(path, format!("line {n}: expected 10 body-info values, found {}", v.len())));
            }
            let (n, v) = next(&format!("the joint count of frame {f} body {b}"))?;
            let joints = count(n, &v, "the joint count")?;
            if joints != KINECT_JOINTS {
                return Err(bad_input(path, format!("line {n}: expected {KINECT_JOINTS} joints, found {joints}")));
            }
            let mut body = Vec::with_capacity(KINECT_JOINTS);
            for j in 0..KINECT_JOINTS {
                let (n, v) = next(&format!("joint {j} of frame {f} body {b}"))?;
                if v.len() != 12 {
                    return Err(bad_input(path, format!("line {n}: expected 12 joint values, found {}", v.len())));
                }
                let num = |i: usize| -> Result<f64, DataError> {
                    v[i].parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(|| {
                        bad_input(path, format!("line {n}: value {} is not a number: {:?}", i + 1, v[i]))
                    })
                };
                let tracking = num(11)?;
                body.push(KinectJoint {
                    depth: (num(3)?, num(4)?),
                    color: (num(5)?, num(6)?),
                    tracking: tracking.clamp(0.0, 255.0) as u8,
                });
            }
            bodies.push(body);
        }
        frames.push(bodies);
    }
    Ok(Skeleton { frames })
}

/// The camera of an NTU name `SsssCcccPpppRrrrAaaa` (e.g. `"C002"`), or `None` when it does not match.
pub fn camera_of(name: &str) -> Option<&str> {
    let b = name.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let ok = b"SCPRA"
        .iter()
        .enumerate()
        .all(|(k, &c)| b[k * 4] == c && b[k * 4 + 1..k * 4 + 4].iter().all(u8::is_ascii_digit));
    ok.then(|| &name[4..8])
}

/// Fits one colour -> depth homography per camera group; `None` for a group whose fit fails.
pub fn fit_homographies(skeletons: &[(String, Skeleton)]) -> HashMap<String, Option<Homography>> {
    let mut pairs: HashMap<String, Vec<PointPair>> = HashMap::new();
    for (name, sk) in skeletons {
        let group = pairs.entry(group_of(name)).or_default();
        for j in sk.frames.iter().flatten().flatten().filter(|j| j.tracking >= 1) {
            group.push((j.color, j.depth));
        }
    }
    pairs.into_iter().map(|(g, p)| (g, Homography::fit(&p))).collect()
}

fn group_of(name: &str) -> String {
    camera_of(name).map_or_else(|| format!("file:{name}"), str::to_string)
}

/// Warps `rgb` into a `width x height` grid through `depth_to_color` (bilinear, black outside).
pub fn warp_rgb(rgb: &RgbImage, depth_to_color: &Homography, width: u32, height: u32) -> RgbImage {
    let mut data = vec![0u8; width as usize * height as usize * 3];
    let (cw, ch) = (f64::from(rgb.width), f64::from(rgb.height));
    for v in 0..height as usize {
        for u in 0..width as usize {
            let Some((x, y)) = depth_to_color.apply(u as f64 + 0.5, v as f64 + 0.5) else { continue };
            if !(x >= 0.0 && y >= 0.0 && x < cw && y < ch) {
                continue;
            }
            let p = bilinear(rgb, (x - 0.5) as f32, (y - 0.5) as f32);
            data[(v * width as usize + u) * 3..][..3].copy_from_slice(&p);
        }
    }
    RgbImage { width, height, data }
}

fn find_rgb(root: &Path, name: &str) -> Option<PathBuf> {
    ["png", "jpg", "jpeg"].iter().map(|ext| root.join("rgb").join(format!("{name}.{ext}"))).find(|p| p.is_file())
}

/// Converts an NTU RGB+D style folder; see the module doc.
pub fn convert_ntu(
    root: &Path,
    out_dir: &Path,
    layout: KeypointLayout,
    opts: &ConvertOptions,
) -> Result<ConvertReport, DataError> {
    let skel_dir = root.join("skeleton");
    let mut names: Vec<(String, PathBuf)> = std::fs::read_dir(&skel_dir)
        .map_err(|e| DataError::io(&skel_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "skeleton"))
        .filter_map(|p| Some((p.file_stem()?.to_str()?.to_string(), p)))
        .collect();
    names.sort();
    let mut skeletons = Vec::with_capacity(names.len());
    for (name, path) in &names {
        skeletons.push((name.clone(), parse_skeleton(path)?));
    }
    let fits = fit_homographies(&skeletons);
    let mapping: &[usize] = match layout {
        KeypointLayout::Mpii16 => &KINECT_TO_MPII16,
        KeypointLayout::Coco13 => &KINECT_TO_COCO13,
    };

    let mut sink = Sink::new(out_dir, opts, "ntu", layout)?;
    for (name, sk) in &skeletons {
        let Some(body) = sk.frames.first().and_then(|f| f.first()) else {
            sink.skip("no body in first frame");
            continue;
        };
        let Some(rgb_path) = find_rgb(root, name) else {
            sink.skip("missing rgb");
            continue;
        };
        let depth_path = root.join("depth").join(format!("{name}.png"));
        if !depth_path.is_file() {
            sink.skip("missing depth");
            continue;
        }
        let Some(to_color) = fits.get(&group_of(name)).copied().flatten().and_then(|h| h.inverse()) else {
            sink.skip("homography fit failed");
            continue;
        };
        let depth = read_depth(&depth_path)?;
        let rgb = warp_rgb(&read_rgb(&rgb_path)?, &to_color, depth.width, depth.height);
        let (dw, dh) = (depth.width as f32, depth.height as f32);
        let kp: Vec<(f32, f32, bool)> =
            mapping.iter().map(|&k| (body[k].depth.0 as f32, body[k].depth.1 as f32, body[k].tracking >= 1)).collect();
        let inside = |x: f32, y: f32| x >= 0.0 && y >= 0.0 && x < dw && y < dh;
        let person = BoxF::of_points(kp.iter().filter(|k| k.2 && inside(k.0, k.1)).map(|k| (k.0, k.1)))
            .or_else(|| foreground_box(&depth));
        let Some(crop) = person.and_then(|b| crop_box(b, depth.width, depth.height, opts.margin, opts.max_side)) else {
            sink.skip("no tracked joints");
            continue;
        };
        let sample = Sample {
            key: format!("ntu/{}", key_part(name)),
            rgb: crop.rgb(&rgb),
            depth: Some(crop.depth(&depth)),
            parts: None,
            layout,
            joints: kp.iter().map(|&(x, y, l)| crop.joint(x, y, l)).collect(),
        };
        sink.append(&sample)?;
    }
    sink.finish(&skel_dir)
}

/// The box of the depth foreground (depth > 0), or `None` when empty.
fn foreground_box(depth: &DepthImage) -> Option<BoxF> {
    let w = depth.width as usize;
    BoxF::of_points(depth.data.iter().enumerate().filter(|(_, d)| **d > 0).flat_map(|(i, _)| {
        let (x, y) = ((i % w) as f32, (i / w) as f32);
        [(x, y), (x + 1.0, y + 1.0)]
    }))
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;
    use crate::convert::test_util::{write_depth_png, write_rgb_png};
    use crate::manifest::Dataset;

    /// Colour -> depth, known.
    fn truth() -> Homography {
        Homography([[0.45, 0.02, 3.0], [-0.01, 0.47, 1.5], [2e-4, 1e-4, 1.0]])
    }

    /// Depth positions of the 25 joints of body `b`.
    fn depth_joint(b: usize, j: usize) -> (f64, f64) {
        (8.0 + (j % 5) as f64 * 4.3 + b as f64 * 2.0, 4.0 + (j / 5) as f64 * 4.1 + (j % 3) as f64 * 0.7)
    }

    fn body_lines(s: &mut String, b: usize, untracked: &[usize]) {
        let inv = truth().inverse().expect("invertible");
        writeln!(s, "7205759403792{b} 0 1 1 1 1 0 0.1 0.2 2").expect("fmt");
        writeln!(s, "25").expect("fmt");
        for j in 0..25 {
            let (dx, dy) = depth_joint(b, j);
            let (cx, cy) = inv.apply(dx, dy).expect("finite");
            let t = if untracked.contains(&j) {
                0
            } else if j == 7 {
                1
            } else {
                2
            };
            writeln!(s, "0.1 0.2 3.0 {dx:.6} {dy:.6} {cx:.6} {cy:.6} 0.5 0.5 0.5 0.5 {t}").expect("fmt");
        }
    }

    fn fixture(root: &Path) -> String {
        let name = "S001C002P003R001A010".to_string();
        let mut s = String::from("2\n2\n");
        body_lines(&mut s, 0, &[6, 14]); // l_wrist and l_ankle untracked
        body_lines(&mut s, 1, &[]);
        s.push_str("1\n");
        body_lines(&mut s, 1, &[]);
        std::fs::create_dir_all(root.join("skeleton")).expect("mkdir");
        std::fs::write(root.join("skeleton").join(format!("{name}.skeleton")), s).expect("write");
        let (dw, dh) = (40u32, 32u32);
        let depth: Vec<u16> = (0..dw * dh)
            .map(|i| if (5..30).contains(&(i % dw)) && (2..28).contains(&(i / dw)) { 2500 } else { 0 })
            .collect();
        write_depth_png(&root.join("depth").join(format!("{name}.png")), dw, dh, &depth);
        write_rgb_png(&root.join("rgb").join(format!("{name}.png")), 96, 72, |x, y| [x as u8 * 2, y as u8 * 3, 60]);
        name
    }

    #[test]
    fn fits_registers_and_converts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = fixture(dir.path());
        let sk = parse_skeleton(&dir.path().join("skeleton").join(format!("{name}.skeleton"))).expect("parse");
        assert_eq!(sk.frames.len(), 2);
        assert_eq!(sk.frames[0].len(), 2);
        let fits = fit_homographies(&[(name.clone(), sk.clone())]);
        let h = fits.get("C002").copied().flatten().expect("fit for C002");
        for j in sk.frames.iter().flatten().flatten() {
            let (x, y) = h.apply(j.color.0, j.color.1).expect("finite");
            assert!((x - j.depth.0).abs() < 0.5 && (y - j.depth.1).abs() < 0.5, "({x}, {y}) vs {:?}", j.depth);
        }

        for layout in KeypointLayout::ALL {
            let out = dir.path().join(format!("out-{layout}"));
            let opts = ConvertOptions { max_side: 0, ..ConvertOptions::default() };
            let report = convert_ntu(dir.path(), &out, layout, &opts).expect("convert");
            assert_eq!((report.samples, report.with_depth), (1, 1));
            assert!(report.manifest.has_modality("depth"));
            let ds = Dataset::open(out.join("manifest.json")).expect("open");
            ds.verify().expect("verify");
            let s = ds.get(0).expect("get");
            assert_eq!(s.key, format!("ntu/{name}"));
            let mapping: &[usize] =
                if layout == KeypointLayout::Mpii16 { &KINECT_TO_MPII16 } else { &KINECT_TO_COCO13 };
            let body = &sk.frames[0][0];
            let vis = mapping
                .iter()
                .filter(|&&k| body[k].tracking >= 1)
                .map(|&k| (body[k].depth.0 as f32, body[k].depth.1 as f32));
            let crop = crop_box(BoxF::of_points(vis).expect("box"), 40, 32, opts.margin, 0).expect("crop");
            assert_eq!((s.rgb.width, s.rgb.height), (crop.width, crop.height));
            for (jt, &k) in s.joints.iter().zip(mapping) {
                let (dx, dy) = body[k].depth;
                assert!((jt.x - (dx as f32 - crop.x0 as f32)).abs() < 1e-4, "{layout} kinect {k}: {jt:?}");
                assert!((jt.y - (dy as f32 - crop.y0 as f32)).abs() < 1e-4, "{layout} kinect {k}: {jt:?}");
                assert_eq!(jt.visible, k != 6 && k != 14, "{layout} kinect {k}");
            }
            // registered RGB: a depth pixel shows the colour at H^-1 of its centre (linear pattern)
            let inv = h.inverse().expect("inverse");
            let d = s.depth.as_ref().expect("depth");
            assert_eq!((d.width, d.height), (s.rgb.width, s.rgb.height));
            for (u, v) in [(3u32, 3u32), (8, 10), (12, 5)] {
                let (cx, cy) = inv.apply(f64::from(u + crop.x0) + 0.5, f64::from(v + crop.y0) + 0.5).expect("finite");
                let want = [((cx - 0.5) * 2.0) as f32, ((cy - 0.5) * 3.0) as f32];
                let got = s.rgb.pixel(u, v).expect("pixel");
                assert!(
                    (f32::from(got[0]) - want[0]).abs() <= 1.5 && (f32::from(got[1]) - want[1]).abs() <= 1.5,
                    "{got:?} vs {want:?}"
                );
                assert_eq!(
                    d.at(u, v),
                    Some(if (5..30).contains(&(u + crop.x0)) && (2..28).contains(&(v + crop.y0)) { 2500 } else { 0 })
                );
            }
        }
    }

    #[test]
    fn camera_names() {
        assert_eq!(camera_of("S017C003P020R002A060"), Some("C003"));
        assert_eq!(camera_of("take_01"), None);
        assert_eq!(group_of("take_01"), "file:take_01");
    }

    #[test]
    fn truncated_skeleton_names_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = fixture(dir.path());
        let path = dir.path().join("skeleton").join(format!("{name}.skeleton"));
        let text = std::fs::read_to_string(&path).expect("read");
        let cut: String = text.lines().take(20).map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, cut).expect("write");
        let err = convert_ntu(dir.path(), &dir.path().join("out"), KeypointLayout::Mpii16, &ConvertOptions::default())
            .expect_err("cut short");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("{name}.skeleton")) && msg.contains("line 20") && msg.contains("joint 16"),
            "{msg}"
        );

        let bad: String = text
            .lines()
            .enumerate()
            .map(|(i, l)| if i == 6 { "1 2 3\n".to_string() } else { format!("{l}\n") })
            .collect();
        std::fs::write(&path, bad).expect("write");
        let err = parse_skeleton(&path).expect_err("short line");
        assert!(err.to_string().contains("line 7: expected 12 joint values, found 3"), "{err}");
    }
}
