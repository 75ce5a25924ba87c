//! Turning decoded samples into the tensors of one rank's slice of a step.
//!
//! RGB: ImageNet mean/std normalised, 3 x H x W. Depth (when present): metres minus the mean of the
//! foreground, background 0, 1 x H x W, stacked only for the samples that have it (`depth_rows` says
//! which). Keypoints: the method page's encoder input (root-relative, scaled into [-1, 1], invisible
//! joints at 0), N x J x 2; a sample with fewer than 2 visible joints has no keypoint modality.
//! Missing modalities travel as masks, never as fake data.
//!
//! For stage 2 the batch also carries, per joint, its cell on the stride-4 map and whether it is
//! visible (labelled and inside the crop), and per sample with depth the P cells DICL samples from its
//! foreground (drawn with a generator seeded by (seed, epoch, slot)).

use hcmoco_data::{KeypointLayout, Sample, normalize_keypoints};
use tch::{Kind, Tensor};

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// One rank's slice of a step, as tensors.
#[derive(Debug)]
pub struct Batch {
    /// b x 3 x H x W
    pub rgb: Tensor,
    /// b_d x 1 x H x W, the samples with depth only.
    pub depth: Tensor,
    /// Row of each depth image in the batch (b_d).
    pub depth_rows: Vec<i64>,
    /// b x J x 2
    pub keypoints: Tensor,
    pub has_depth: Vec<bool>,
    pub has_keypoints: Vec<bool>,
    /// Each sample's global id (dataset offset + index) and plan slot.
    pub ids: Vec<i64>,
    pub slots: Vec<u64>,
    /// The epoch of the step (every sample of a step comes from one epoch of the plan).
    pub epoch: u64,
    /// b x J x 2 int64: (row, col) of each joint's cell on the stride-4 map, clamped into it.
    pub joint_cells: Tensor,
    /// b x J: the joint is labelled and inside the crop.
    pub joint_visible: Vec<bool>,
    /// DICL: rows of `depth` (0..b_d) whose foreground is not empty, and their cells (n x P int64, flat
    /// index row * w + col on the stride-4 map). Empty when DICL is off.
    pub dicl_rows: Vec<i64>,
    pub dicl_cells: Tensor,
}

/// What a sample is, beyond its pixels: where it sits in the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleTag {
    /// Global id: the offset of its dataset in the job's dataset list plus its index.
    pub id: i64,
    pub epoch: u64,
    pub slot: u64,
}

/// Options of [`build`] beyond the samples.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    pub layout: KeypointLayout,
    /// (width, height) of every sample of the step.
    pub image_size: (u32, u32),
    pub kind: Kind,
    /// DICL cells per sample with depth (0: none drawn).
    pub dicl_points: usize,
    pub seed: u64,
}

/// Side of the stride-4 map of an image side (two stride-2 convolutions with padding 1).
pub fn map_side(pixels: i64) -> i64 {
    ((pixels + 1) / 2 + 1) / 2
}

impl Batch {
    pub fn len(&self) -> usize {
        self.has_depth.len()
    }

    pub fn is_empty(&self) -> bool {
        self.has_depth.is_empty()
    }

    /// The same batch with its tensors on `device`.
    pub fn to_device(self, device: tch::Device) -> Batch {
        if device == tch::Device::Cpu {
            return self;
        }
        Batch {
            rgb: self.rgb.to_device(device),
            depth: self.depth.to_device(device),
            keypoints: self.keypoints.to_device(device),
            joint_cells: self.joint_cells.to_device(device),
            dicl_cells: self.dicl_cells.to_device(device),
            ..self
        }
    }
}

/// Why samples cannot form a batch.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("sample {key}: image is {w}x{h}, the batch's first sample is {w0}x{h0} (one size per step)")]
    Size { key: String, w: u32, h: u32, w0: u32, h0: u32 },
    #[error("sample {key}: keypoint layout {got}, the job's layout is {want}")]
    Layout { key: String, got: KeypointLayout, want: KeypointLayout },
    #[error("sample {key}: {what} holds {got} values, expected {want}")]
    Length { key: String, what: &'static str, got: usize, want: usize },
    #[error("{samples} samples but {tags} tags")]
    Tags { samples: usize, tags: usize },
}

/// Builds a batch from decoded samples (possibly none) and their tags (same order).
pub fn build(samples: &[Sample], tags: &[SampleTag], opts: &BatchOptions) -> Result<Batch, BatchError> {
    if samples.len() != tags.len() {
        return Err(BatchError::Tags { samples: samples.len(), tags: tags.len() });
    }
    let BatchOptions { layout, image_size, kind, dicl_points, seed } = *opts;
    let (w0, h0) = image_size;
    let (mh, mw) = (map_side(i64::from(h0)), map_side(i64::from(w0)));
    let mut joint_cells = Vec::with_capacity(samples.len() * layout.num_joints() * 2);
    let mut joint_visible = Vec::with_capacity(samples.len() * layout.num_joints());
    let mut dicl_rows = Vec::new();
    let mut dicl_cells = Vec::new();
    let (w, h) = (w0 as usize, h0 as usize);
    let joints = layout.num_joints();
    let mut rgb = Vec::with_capacity(samples.len() * 3 * h * w);
    let mut depth = Vec::new();
    let mut depth_rows = Vec::new();
    let mut kps = Vec::with_capacity(samples.len() * 2 * joints);
    let mut has_depth = Vec::with_capacity(samples.len());
    let mut has_keypoints = Vec::with_capacity(samples.len());
    for (row, s) in samples.iter().enumerate() {
        if (s.rgb.width, s.rgb.height) != (w0, h0) {
            return Err(BatchError::Size { key: s.key.clone(), w: s.rgb.width, h: s.rgb.height, w0, h0 });
        }
        if s.layout != layout {
            return Err(BatchError::Layout { key: s.key.clone(), got: s.layout, want: layout });
        }
        if s.rgb.data.len() != 3 * h * w {
            return Err(BatchError::Length { key: s.key.clone(), what: "rgb", got: s.rgb.data.len(), want: 3 * h * w });
        }
        for c in 0..3 {
            rgb.extend(s.rgb.data[c..].iter().step_by(3).map(|&v| (f32::from(v) / 255.0 - MEAN[c]) / STD[c]));
        }
        match &s.depth {
            Some(d) => {
                if (d.width, d.height) != (w0, h0) {
                    return Err(BatchError::Size { key: s.key.clone(), w: d.width, h: d.height, w0, h0 });
                }
                if d.data.len() != h * w {
                    return Err(BatchError::Length {
                        key: s.key.clone(),
                        what: "depth",
                        got: d.data.len(),
                        want: h * w,
                    });
                }
                let fg: Vec<f32> = d.data.iter().filter(|&&v| v > 0).map(|&v| f32::from(v) / 1000.0).collect();
                let mean = if fg.is_empty() { 0.0 } else { fg.iter().sum::<f32>() / fg.len() as f32 };
                depth.extend(d.data.iter().map(|&v| if v > 0 { f32::from(v) / 1000.0 - mean } else { 0.0 }));
                if dicl_points > 0 {
                    let fg = crate::loss::nearest_mask(&d.data, h, w, mh as usize, mw as usize);
                    let t = &tags[row];
                    let cells =
                        crate::loss::draw_cells(&fg, dicl_points, crate::loss::dicl_seed(seed, t.epoch, t.slot));
                    if !cells.is_empty() {
                        dicl_rows.push(depth_rows.len() as i64);
                        dicl_cells.extend(cells);
                    }
                }
                depth_rows.push(row as i64);
                has_depth.push(true);
            }
            None => has_depth.push(false),
        }
        if s.joints.len() != joints {
            return Err(BatchError::Length { key: s.key.clone(), what: "joints", got: s.joints.len(), want: joints });
        }
        for j in &s.joints {
            let (r, c) = crate::loss::joint_cell(j.x, j.y, 4, mh, mw);
            joint_cells.extend([r, c]);
            joint_visible.push(j.visible && j.x.is_finite() && j.y.is_finite());
        }
        match normalize_keypoints(layout, &s.joints) {
            Some(p) => {
                kps.extend(p.iter().flat_map(|xy| [xy[0], xy[1]]));
                has_keypoints.push(true);
            }
            None => {
                kps.extend(std::iter::repeat_n(0.0, 2 * joints));
                has_keypoints.push(false);
            }
        }
    }
    let (b, bd) = (samples.len() as i64, depth_rows.len() as i64);
    let to = |v: Vec<f32>, shape: &[i64]| Tensor::from_slice(&v).view(shape).to_kind(kind);
    Ok(Batch {
        rgb: to(rgb, &[b, 3, h as i64, w as i64]),
        depth: to(depth, &[bd, 1, h as i64, w as i64]),
        depth_rows,
        keypoints: to(kps, &[b, joints as i64, 2]),
        has_depth,
        has_keypoints,
        ids: tags.iter().map(|t| t.id).collect(),
        slots: tags.iter().map(|t| t.slot).collect(),
        epoch: tags.first().map_or(0, |t| t.epoch),
        joint_cells: Tensor::from_slice(&joint_cells).view([b, joints as i64, 2]),
        joint_visible,
        dicl_cells: Tensor::from_slice(&dicl_cells).view([dicl_rows.len() as i64, dicl_points as i64]),
        dicl_rows,
    })
}
