//! Turning decoded samples into the tensors of one rank's slice of a step.
//!
//! RGB: ImageNet mean/std normalised, 3 x H x W. Depth (when present): metres minus the mean of the
//! foreground, background 0, 1 x H x W, stacked only for the samples that have it (`depth_rows` says
//! which). Keypoints: the method page's encoder input (root-relative, scaled into [-1, 1], invisible
//! joints at 0), flattened to 2J; a sample with fewer than 2 visible joints has no keypoint modality.
//! Missing modalities travel as masks, never as fake data.

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
    /// b x 2J
    pub keypoints: Tensor,
    pub has_depth: Vec<bool>,
    pub has_keypoints: Vec<bool>,
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
}

/// Builds a batch of `kind` from decoded samples (possibly none).
pub fn build(
    samples: &[Sample],
    layout: KeypointLayout,
    image_size: (u32, u32),
    kind: Kind,
) -> Result<Batch, BatchError> {
    let (w0, h0) = image_size;
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
                depth_rows.push(row as i64);
                has_depth.push(true);
            }
            None => has_depth.push(false),
        }
        if s.joints.len() != joints {
            return Err(BatchError::Length { key: s.key.clone(), what: "joints", got: s.joints.len(), want: joints });
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
        keypoints: to(kps, &[b, 2 * joints as i64]),
        has_depth,
        has_keypoints,
    })
}
