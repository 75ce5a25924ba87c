//! The in-memory sample: RGB, optional depth, optional part labels, 2D keypoints.

use crate::layout::KeypointLayout;

/// One 2D keypoint: pixel position in the image, and whether it is labelled and inside the image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Joint {
    pub x: f32,
    pub y: f32,
    pub visible: bool,
}

/// An 8-bit RGB image, row-major HWC (`data.len() == width * height * 3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// A depth map in millimetres, row-major (`data.len() == width * height`); background is 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepthImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u16>,
}

/// Per-pixel body-part labels, row-major (`data.len() == width * height`); 0 is background, `1..`
/// index [`crate::PART_NAMES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// One multi-modal sample. `depth` is `None` for RGB-only samples (the `has_depth` flag); `parts` is
/// present when the source knows body-part labels (for downstream evaluation, not for training).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub key: String,
    pub rgb: RgbImage,
    pub depth: Option<DepthImage>,
    pub parts: Option<LabelImage>,
    pub layout: KeypointLayout,
    pub joints: Vec<Joint>,
}

impl RgbImage {
    /// `width * height * 3`, or `None` on overflow.
    pub fn expected_len(width: u32, height: u32) -> Option<usize> {
        (width as usize).checked_mul(height as usize)?.checked_mul(3)
    }

    /// The RGB triple at `(x, y)`, or `None` outside the image (or for a malformed buffer).
    pub fn pixel(&self, x: u32, y: u32) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        let p = self.data.get(i..i + 3)?;
        Some([p[0], p[1], p[2]])
    }
}

impl DepthImage {
    /// `width * height`, or `None` on overflow.
    pub fn expected_len(width: u32, height: u32) -> Option<usize> {
        (width as usize).checked_mul(height as usize)
    }

    /// The depth (mm) at `(x, y)`, or `None` outside the image (or for a malformed buffer).
    pub fn at(&self, x: u32, y: u32) -> Option<u16> {
        if x >= self.width || y >= self.height {
            return None;
        }
        self.data.get(y as usize * self.width as usize + x as usize).copied()
    }
}

impl LabelImage {
    /// `width * height`, or `None` on overflow.
    pub fn expected_len(width: u32, height: u32) -> Option<usize> {
        (width as usize).checked_mul(height as usize)
    }

    /// The label at `(x, y)`, or `None` outside the image (or for a malformed buffer).
    pub fn at(&self, x: u32, y: u32) -> Option<u8> {
        if x >= self.width || y >= self.height {
            return None;
        }
        self.data.get(y as usize * self.width as usize + x as usize).copied()
    }
}

impl Sample {
    /// Whether the sample carries a depth map.
    pub fn has_depth(&self) -> bool {
        self.depth.is_some()
    }

    /// Whether the sample carries body-part labels.
    pub fn has_parts(&self) -> bool {
        self.parts.is_some()
    }

    /// Number of visible joints.
    pub fn visible_joints(&self) -> usize {
        self.joints.iter().filter(|j| j.visible).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_access_is_bounds_checked() {
        let rgb = RgbImage { width: 2, height: 1, data: vec![1, 2, 3, 4, 5, 6] };
        assert_eq!(rgb.pixel(1, 0), Some([4, 5, 6]));
        assert_eq!(rgb.pixel(2, 0), None);
        let short = RgbImage { width: 2, height: 2, data: vec![0; 6] };
        assert_eq!(short.pixel(1, 1), None);
        let depth = DepthImage { width: 2, height: 1, data: vec![0, 2500] };
        assert_eq!(depth.at(1, 0), Some(2500));
        assert_eq!(depth.at(0, 1), None);
        let parts = LabelImage { width: 1, height: 2, data: vec![0, 14] };
        assert_eq!(parts.at(0, 1), Some(14));
        assert_eq!(parts.at(1, 0), None);
    }
}
