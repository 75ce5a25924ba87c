//! Keypoint layouts (MPII-16, COCO-13) and the keypoint-encoder input normalisation.
//!
//! Both layouts are fixed by the method page ("Inputs"): joint order, parents and root. Converters map
//! source layouts into one of these; everything downstream indexes joints by these numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::sample::Joint;

/// The 2D keypoint layout of a sample (one layout per job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeypointLayout {
    /// MPII, 16 joints, root = pelvis (6).
    Mpii16,
    /// COCO without eyes and ears, 13 joints, root = head (6, the COCO nose).
    Coco13,
}

const MPII16_NAMES: [&str; 16] = [
    "r_ankle",
    "r_knee",
    "r_hip",
    "l_hip",
    "l_knee",
    "l_ankle",
    "pelvis",
    "thorax",
    "upper_neck",
    "head_top",
    "r_wrist",
    "r_elbow",
    "r_shoulder",
    "l_shoulder",
    "l_elbow",
    "l_wrist",
];
const MPII16_PARENTS: [i32; 16] = [1, 2, 6, 6, 3, 4, -1, 6, 7, 8, 11, 12, 8, 8, 13, 14];

const COCO13_NAMES: [&str; 13] = [
    "l_ankle",
    "l_knee",
    "l_hip",
    "r_hip",
    "r_knee",
    "r_ankle",
    "head",
    "l_wrist",
    "l_elbow",
    "l_shoulder",
    "r_shoulder",
    "r_elbow",
    "r_wrist",
];
const COCO13_PARENTS: [i32; 13] = [1, 2, 9, 10, 3, 4, -1, 8, 9, 6, 6, 10, 11];

impl KeypointLayout {
    /// Every layout, in a fixed order.
    pub const ALL: [KeypointLayout; 2] = [KeypointLayout::Mpii16, KeypointLayout::Coco13];

    /// Number of joints J.
    pub fn num_joints(self) -> usize {
        self.joint_names().len()
    }

    /// Parent of each joint in the skeleton tree; -1 for the root.
    pub fn parents(self) -> &'static [i32] {
        match self {
            KeypointLayout::Mpii16 => &MPII16_PARENTS,
            KeypointLayout::Coco13 => &COCO13_PARENTS,
        }
    }

    /// The root joint: MPII-16 pelvis (6), COCO-13 head (6).
    pub fn root(self) -> usize {
        6
    }

    /// The hip joints as `(left_hip, right_hip)`: MPII-16 `(3, 2)`, COCO-13 `(2, 3)`.
    pub fn hips(self) -> (usize, usize) {
        match self {
            KeypointLayout::Mpii16 => (3, 2),
            KeypointLayout::Coco13 => (2, 3),
        }
    }

    /// Joint names, index = joint id.
    pub fn joint_names(self) -> &'static [&'static str] {
        match self {
            KeypointLayout::Mpii16 => &MPII16_NAMES,
            KeypointLayout::Coco13 => &COCO13_NAMES,
        }
    }

    /// Skeleton edges `(child, parent)`, i.e. every joint but the root with its parent.
    pub fn edges(self) -> impl Iterator<Item = (usize, usize)> {
        self.parents().iter().enumerate().filter_map(|(j, &p)| usize::try_from(p).ok().map(|p| (j, p)))
    }

    /// The wire name (`"mpii16"` / `"coco13"`), as in manifests and `kp2d.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeypointLayout::Mpii16 => "mpii16",
            KeypointLayout::Coco13 => "coco13",
        }
    }
}

impl fmt::Display for KeypointLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeypointLayout {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mpii16" => Ok(KeypointLayout::Mpii16),
            "coco13" => Ok(KeypointLayout::Coco13),
            other => Err(DataError::UnknownLayout(other.to_string())),
        }
    }
}

/// The keypoint-encoder input of one sample (method page, "Inputs").
///
/// Positions are taken relative to an origin and divided by the largest absolute coordinate over the
/// visible joints, so visible joints lie in `[-1, 1]` (the extreme one at exactly +-1); invisible joints
/// are `(0, 0)`.
///
/// Origin: the root joint when it is visible; otherwise the mean of the visible hips; if neither hip is
/// visible either, the mean of all visible joints (this last fallback is the project's choice, the
/// method page does not cover it).
///
/// A joint flagged visible but with a non-finite coordinate is treated as invisible.
///
/// Returns `None` (no keypoint modality for the sample-level terms) when fewer than 2 joints are
/// visible, or when `joints.len()` does not match the layout. When every visible joint coincides with
/// the origin (scale 0), all positions are `(0, 0)` rather than NaN.
pub fn normalize_keypoints(layout: KeypointLayout, joints: &[Joint]) -> Option<Vec<[f32; 2]>> {
    if joints.len() != layout.num_joints() {
        return None;
    }
    let visible = |j: &Joint| j.visible && j.x.is_finite() && j.y.is_finite();
    if joints.iter().filter(|j| visible(j)).count() < 2 {
        return None;
    }

    let mean_of = |idx: &mut dyn Iterator<Item = &Joint>| -> Option<(f32, f32)> {
        let (mut sx, mut sy, mut n) = (0.0f64, 0.0f64, 0u32);
        for j in idx {
            sx += f64::from(j.x);
            sy += f64::from(j.y);
            n += 1;
        }
        (n > 0).then(|| ((sx / f64::from(n)) as f32, (sy / f64::from(n)) as f32))
    };

    let root = &joints[layout.root()];
    let (ox, oy) = if visible(root) {
        (root.x, root.y)
    } else {
        let (lh, rh) = layout.hips();
        let hips = [&joints[lh], &joints[rh]];
        mean_of(&mut hips.into_iter().filter(|j| visible(j)))
            .or_else(|| mean_of(&mut joints.iter().filter(|j| visible(j))))?
    };

    let scale =
        joints.iter().filter(|j| visible(j)).map(|j| (j.x - ox).abs().max((j.y - oy).abs())).fold(0.0f32, f32::max);

    let out = joints
        .iter()
        .map(|j| {
            if !visible(j) || scale <= 0.0 || !scale.is_finite() {
                [0.0, 0.0]
            } else {
                [(j.x - ox) / scale, (j.y - oy) / scale]
            }
        })
        .collect();
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joint(x: f32, y: f32, visible: bool) -> Joint {
        Joint { x, y, visible }
    }

    #[test]
    fn tables_are_consistent() {
        for layout in KeypointLayout::ALL {
            let n = layout.num_joints();
            assert_eq!(layout.parents().len(), n);
            assert_eq!(layout.parents()[layout.root()], -1);
            assert_eq!(layout.parents().iter().filter(|&&p| p < 0).count(), 1);
            assert_eq!(layout.edges().count(), n - 1);
            // every joint reaches the root (a tree, no cycles)
            for start in 0..n {
                let mut j = start;
                let mut steps = 0;
                while layout.parents()[j] >= 0 {
                    j = layout.parents()[j] as usize;
                    steps += 1;
                    assert!(steps <= n, "{layout}: cycle from joint {start}");
                }
                assert_eq!(j, layout.root());
            }
            let (l, r) = layout.hips();
            assert_eq!(layout.joint_names()[l], "l_hip");
            assert_eq!(layout.joint_names()[r], "r_hip");
        }
        assert_eq!(KeypointLayout::Mpii16.num_joints(), 16);
        assert_eq!(KeypointLayout::Coco13.num_joints(), 13);
        assert_eq!(KeypointLayout::Mpii16.joint_names()[6], "pelvis");
        assert_eq!(KeypointLayout::Coco13.joint_names()[6], "head");
    }

    #[test]
    fn names_round_trip() {
        for layout in KeypointLayout::ALL {
            let s = layout.to_string();
            assert_eq!(s.parse::<KeypointLayout>().ok(), Some(layout));
            let json = serde_json::to_string(&layout).expect("serialize");
            assert_eq!(json, format!("\"{s}\""));
            let back: KeypointLayout = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back, layout);
        }
        let err = "mpii".parse::<KeypointLayout>().expect_err("unknown layout");
        assert!(err.to_string().contains("mpii"), "{err}");
    }

    fn mpii_pose() -> Vec<Joint> {
        (0..16).map(|i| joint(100.0 + 3.0 * i as f32, 50.0 - 2.0 * i as f32, true)).collect()
    }

    #[test]
    fn normalize_root_relative_unit_max() {
        let mut joints = mpii_pose();
        joints[0].visible = false;
        joints[0].x = 10_000.0; // an invisible outlier must not set the scale
        let out = normalize_keypoints(KeypointLayout::Mpii16, &joints).expect("enough visible");
        assert_eq!(out.len(), 16);
        assert_eq!(out[6], [0.0, 0.0], "root maps to the origin");
        assert_eq!(out[0], [0.0, 0.0], "invisible joints are zero");
        let max = out.iter().flat_map(|p| p.iter()).fold(0.0f32, |m, v| m.max(v.abs()));
        assert_eq!(max, 1.0);
        for p in &out {
            assert!(p[0].abs() <= 1.0 && p[1].abs() <= 1.0);
        }
        // relative geometry is preserved: joint 15 is 9 steps from the root
        let s = 27.0f32; // max |dx| = 3 * 9 at joint 15
        assert!((out[15][0] - 27.0 / s).abs() < 1e-6);
        assert!((out[15][1] + 18.0 / s).abs() < 1e-6);
    }

    #[test]
    fn normalize_too_few_visible() {
        let mut joints = mpii_pose();
        for j in joints.iter_mut().skip(1) {
            j.visible = false;
        }
        assert_eq!(normalize_keypoints(KeypointLayout::Mpii16, &joints), None);
        for j in joints.iter_mut() {
            j.visible = false;
        }
        assert_eq!(normalize_keypoints(KeypointLayout::Mpii16, &joints), None);
        // wrong joint count for the layout
        assert_eq!(normalize_keypoints(KeypointLayout::Coco13, &mpii_pose()), None);
    }

    #[test]
    fn normalize_root_invisible_uses_hips() {
        let mut joints = vec![joint(0.0, 0.0, false); 16];
        joints[2] = joint(10.0, 20.0, true); // r_hip
        joints[3] = joint(30.0, 20.0, true); // l_hip
        joints[9] = joint(20.0, -20.0, true); // head_top
        joints[6] = joint(500.0, 500.0, false); // root invisible
        let out = normalize_keypoints(KeypointLayout::Mpii16, &joints).expect("3 visible");
        // origin = (20, 20); scale = 40 (head_top dy)
        assert_eq!(out[2], [-0.25, 0.0]);
        assert_eq!(out[3], [0.25, 0.0]);
        assert_eq!(out[9], [0.0, -1.0]);
        assert_eq!(out[6], [0.0, 0.0]);

        // one hip visible: that hip is the origin
        joints[3].visible = false;
        let out = normalize_keypoints(KeypointLayout::Mpii16, &joints).expect("2 visible");
        assert_eq!(out[2], [0.0, 0.0]);
        assert_eq!(out[9], [0.25, -1.0]);
    }

    #[test]
    fn normalize_no_root_no_hips_uses_mean() {
        let mut joints = vec![joint(0.0, 0.0, false); 13];
        joints[7] = joint(0.0, 0.0, true);
        joints[12] = joint(10.0, 4.0, true);
        let out = normalize_keypoints(KeypointLayout::Coco13, &joints).expect("2 visible");
        assert_eq!(out[7], [-1.0, -0.4]);
        assert_eq!(out[12], [1.0, 0.4]);
    }

    #[test]
    fn normalize_zero_scale_is_zero_not_nan() {
        let mut joints = vec![joint(7.0, 7.0, true); 16];
        joints[0].visible = false;
        let out = normalize_keypoints(KeypointLayout::Mpii16, &joints).expect("visible");
        assert!(out.iter().all(|p| *p == [0.0, 0.0]));
    }
}

/// Body-part labels of `parts.png` (index = label value; 0 is background). 14 parts plus background,
/// left and right as seen by the person.
pub const PART_NAMES: [&str; 15] = [
    "background",
    "head",
    "torso",
    "right_upper_arm",
    "right_lower_arm",
    "left_upper_arm",
    "left_lower_arm",
    "right_upper_leg",
    "right_lower_leg",
    "left_upper_leg",
    "left_lower_leg",
    "right_hand",
    "left_hand",
    "right_foot",
    "left_foot",
];

/// The largest part label (`PART_NAMES.len() - 1`); `parts.png` values above it are an error.
pub const MAX_PART_LABEL: u8 = (PART_NAMES.len() - 1) as u8;

/// Part label values, index into [`PART_NAMES`].
pub mod part {
    pub const BACKGROUND: u8 = 0;
    pub const HEAD: u8 = 1;
    pub const TORSO: u8 = 2;
    pub const R_UPPER_ARM: u8 = 3;
    pub const R_LOWER_ARM: u8 = 4;
    pub const L_UPPER_ARM: u8 = 5;
    pub const L_LOWER_ARM: u8 = 6;
    pub const R_UPPER_LEG: u8 = 7;
    pub const R_LOWER_LEG: u8 = 8;
    pub const L_UPPER_LEG: u8 = 9;
    pub const L_LOWER_LEG: u8 = 10;
    pub const R_HAND: u8 = 11;
    pub const L_HAND: u8 = 12;
    pub const R_FOOT: u8 = 13;
    pub const L_FOOT: u8 = 14;
}

use part::*;

/// MPII-16, per joint: the parts that meet there (the neck belongs to the head).
const MPII16_ADJACENT: [&[u8]; 16] = [
    &[R_LOWER_LEG, R_FOOT],             // r_ankle
    &[R_UPPER_LEG, R_LOWER_LEG],        // r_knee
    &[TORSO, R_UPPER_LEG],              // r_hip
    &[TORSO, L_UPPER_LEG],              // l_hip
    &[L_UPPER_LEG, L_LOWER_LEG],        // l_knee
    &[L_LOWER_LEG, L_FOOT],             // l_ankle
    &[TORSO, R_UPPER_LEG, L_UPPER_LEG], // pelvis
    &[TORSO, HEAD],                     // thorax
    &[HEAD, TORSO],                     // upper_neck
    &[HEAD],                            // head_top
    &[R_LOWER_ARM, R_HAND],             // r_wrist
    &[R_UPPER_ARM, R_LOWER_ARM],        // r_elbow
    &[TORSO, R_UPPER_ARM],              // r_shoulder
    &[TORSO, L_UPPER_ARM],              // l_shoulder
    &[L_UPPER_ARM, L_LOWER_ARM],        // l_elbow
    &[L_LOWER_ARM, L_HAND],             // l_wrist
];

/// COCO-13, per joint: the parts that meet there.
const COCO13_ADJACENT: [&[u8]; 13] = [
    &[L_LOWER_LEG, L_FOOT],      // l_ankle
    &[L_UPPER_LEG, L_LOWER_LEG], // l_knee
    &[TORSO, L_UPPER_LEG],       // l_hip
    &[TORSO, R_UPPER_LEG],       // r_hip
    &[R_UPPER_LEG, R_LOWER_LEG], // r_knee
    &[R_LOWER_LEG, R_FOOT],      // r_ankle
    &[HEAD],                     // head (nose)
    &[L_LOWER_ARM, L_HAND],      // l_wrist
    &[L_UPPER_ARM, L_LOWER_ARM], // l_elbow
    &[TORSO, L_UPPER_ARM],       // l_shoulder
    &[TORSO, R_UPPER_ARM],       // r_shoulder
    &[R_UPPER_ARM, R_LOWER_ARM], // r_elbow
    &[R_LOWER_ARM, R_HAND],      // r_wrist
];

/// The part labels (values of [`PART_NAMES`]) adjacent to `joint` of `layout`: a visible keypoint lies
/// on (within a pixel of) one of them. Empty for a joint index outside the layout.
pub fn adjacent_parts(layout: KeypointLayout, joint: usize) -> &'static [u8] {
    let table: &[&'static [u8]] = match layout {
        KeypointLayout::Mpii16 => &MPII16_ADJACENT,
        KeypointLayout::Coco13 => &COCO13_ADJACENT,
    };
    table.get(joint).copied().unwrap_or(&[])
}

#[cfg(test)]
mod part_tests {
    use super::*;

    #[test]
    fn adjacency_tables_are_consistent() {
        assert_eq!(MAX_PART_LABEL, 14);
        assert_eq!(PART_NAMES[usize::from(L_FOOT)], "left_foot");
        assert_eq!(PART_NAMES[usize::from(R_UPPER_ARM)], "right_upper_arm");
        for layout in KeypointLayout::ALL {
            let mut seen = [false; 15];
            for j in 0..layout.num_joints() {
                let adj = adjacent_parts(layout, j);
                assert!(!adj.is_empty(), "{layout} joint {j}");
                for &p in adj {
                    assert!((1..=MAX_PART_LABEL).contains(&p));
                    seen[usize::from(p)] = true;
                }
                // sides agree with the joint's name
                let name = layout.joint_names()[j];
                for &p in adj {
                    let part = PART_NAMES[usize::from(p)];
                    if name.starts_with("l_") && part.starts_with("right")
                        || name.starts_with("r_") && part.starts_with("left")
                    {
                        panic!("{layout} joint {name} next to {part}");
                    }
                }
            }
            // every part touches some joint
            assert!(seen[1..].iter().all(|&s| s), "{layout}: {seen:?}");
            assert!(adjacent_parts(layout, layout.num_joints()).is_empty());
        }
    }
}
