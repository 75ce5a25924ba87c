//! Converters from real dataset formats into shards + `manifest.json`.
//!
//! - [`coco`]: COCO person keypoints (annotation JSON + images) -> RGB + COCO-13 keypoints.
//! - [`mpii`]: MPII in the widely used JSON form (HRNet repos) -> RGB + MPII-16 keypoints.
//! - [`ntu`]: NTU RGB+D style folders (RGB frames, masked 16-bit depth, `.skeleton` files) ->
//!   RGB + depth + keypoints in either layout, RGB registered into the depth frame by a per-camera
//!   homography ([`homography`]).
//!
//! Shared here: [`ConvertOptions`], [`ConvertReport`], the person crop ([`crop_box`], [`Crop`]), source
//! image decoding (PNG of any colour type, JPEG) and the sequential shard sink.
//!
//! Every converter produces person-centred crops: a box (visible keypoints or the annotation's box)
//! scaled by `margin` about its centre, clamped to the image and rounded out to whole pixels; RGB,
//! depth and keypoints go through the same shift and the same resize (longer side at most
//! `max_side`). A joint is visible when labelled and inside the crop (`0 <= x < w`, `0 <= y < h`,
//! pixel `i` covering `[i, i + 1)`). RGB is resampled bilinearly, depth by nearest neighbour (no
//! mixing of foreground and the 0 background).
//!
//! Errors in the source files are [`DataError::Io`] with kind `InvalidData`, naming the file and the
//! annotation id / line at fault.

pub mod coco;
pub mod homography;
pub mod mpii;
pub mod ntu;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use crate::error::DataError;
use crate::layout::KeypointLayout;
use crate::manifest::{MANIFEST_FORMAT, Manifest, ShardEntry};
use crate::sample::{DepthImage, Joint, RgbImage, Sample};
use crate::shard::ShardWriter;

pub use coco::convert_coco;
pub use mpii::convert_mpii;
pub use ntu::convert_ntu;

/// Settings shared by the converters.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertOptions {
    /// Samples per shard (at least 1).
    pub shard_size: u64,
    /// The manifest's `name`.
    pub name: String,
    /// The person box is scaled by this factor about its centre before clamping (at least 1).
    pub margin: f32,
    /// Resize the crop so that its longer side is at most this; 0 keeps the crop's size.
    pub max_side: u32,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions { shard_size: 256, name: "converted".to_string(), margin: 1.25, max_side: 320 }
    }
}

impl ConvertOptions {
    fn validate(&self) -> Result<(), DataError> {
        let bad = |field: &'static str, detail: String| DataError::SynthConfig { field, detail };
        if self.shard_size == 0 {
            return Err(bad("shard_size", "must be at least 1".into()));
        }
        if self.name.trim().is_empty() {
            return Err(bad("name", "must not be empty".into()));
        }
        if !(self.margin.is_finite() && self.margin >= 1.0) {
            return Err(bad("margin", format!("{} must be a finite number >= 1", self.margin)));
        }
        Ok(())
    }
}

/// What a conversion produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertReport {
    /// Samples written.
    pub samples: u64,
    /// Of which with depth.
    pub with_depth: u64,
    /// Source items not converted: reason -> count.
    pub skipped: BTreeMap<String, u64>,
    /// The manifest written to `out_dir/manifest.json`.
    pub manifest: Manifest,
}

/// An error in a source file: names the file and what is wrong (annotation id, line, field).
pub(crate) fn bad_input(path: &Path, detail: impl Into<String>) -> DataError {
    DataError::io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, detail.into()))
}

/// Reads and parses a JSON file; a parse error names the file, line and column.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| bad_input(path, format!("malformed json: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Source images

/// Largest accepted source image side.
const MAX_SOURCE_SIDE: u32 = 16_384;

/// Decodes a source RGB image (JPEG, or PNG of any colour type; alpha dropped, 16-bit reduced).
pub(crate) fn read_rgb(path: &Path) -> Result<RgbImage, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.starts_with(&[0x89, b'P', b'N', b'G']) {
        decode_png_rgb(&bytes).map_err(|e| bad_input(path, format!("png: {e}")))
    } else if bytes.starts_with(&[0xFF, 0xD8]) {
        decode_jpeg_rgb(&bytes).map_err(|e| bad_input(path, format!("jpeg: {e}")))
    } else {
        Err(bad_input(path, "not a png or jpeg image"))
    }
}

fn png_reader(bytes: &[u8], transform: png::Transformations) -> Result<png::Reader<Cursor<&[u8]>>, String> {
    let mut decoder = png::Decoder::new_with_limits(Cursor::new(bytes), png::Limits { bytes: 1 << 30 });
    decoder.set_transformations(transform);
    let reader = decoder.read_info().map_err(|e| e.to_string())?;
    let (w, h) = (reader.info().width, reader.info().height);
    if w == 0 || h == 0 || w > MAX_SOURCE_SIDE || h > MAX_SOURCE_SIDE {
        return Err(format!("unsupported size {w}x{h}"));
    }
    Ok(reader)
}

fn decode_png_rgb(bytes: &[u8]) -> Result<RgbImage, String> {
    let mut reader = png_reader(bytes, png::Transformations::EXPAND | png::Transformations::STRIP_16)?;
    let (width, height) = (reader.info().width, reader.info().height);
    let size = reader.output_buffer_size().ok_or("image too large")?;
    let mut buf = vec![0u8; size];
    let out = reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
    buf.truncate(out.buffer_size());
    let channels = match out.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err("indexed colour was not expanded".into()),
    };
    if out.bit_depth != png::BitDepth::Eight {
        return Err(format!("unsupported bit depth {:?}", out.bit_depth));
    }
    let n = (width as usize) * (height as usize);
    if buf.len() < n * channels {
        return Err("decoded size does not match the header".into());
    }
    let data = match channels {
        3 => buf,
        4 => buf.chunks_exact(4).take(n).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        _ => buf.chunks_exact(channels).take(n).flat_map(|p| [p[0], p[0], p[0]]).collect(),
    };
    Ok(RgbImage { width, height, data })
}

fn decode_jpeg_rgb(bytes: &[u8]) -> Result<RgbImage, String> {
    use zune_jpeg::zune_core::bytestream::ZCursor;
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;

    let side = MAX_SOURCE_SIDE as usize;
    let options =
        DecoderOptions::default().set_max_width(side).set_max_height(side).jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    decoder.decode_headers().map_err(|e| format!("{e:?}"))?;
    let info = decoder.info().ok_or("no image header")?;
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    if width == 0 || height == 0 {
        return Err(format!("unsupported size {width}x{height}"));
    }
    let data = decoder.decode().map_err(|e| format!("{e:?}"))?;
    if Some(data.len()) != RgbImage::expected_len(width, height) {
        return Err(format!("decoded {} bytes, expected {width}x{height}x3", data.len()));
    }
    Ok(RgbImage { width, height, data })
}

/// Decodes a 16-bit grayscale depth PNG (millimetres, background 0).
pub(crate) fn read_depth(path: &Path) -> Result<DepthImage, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let mut reader =
        png_reader(&bytes, png::Transformations::IDENTITY).map_err(|e| bad_input(path, format!("png: {e}")))?;
    let (width, height) = (reader.info().width, reader.info().height);
    let (color, depth) = (reader.info().color_type, reader.info().bit_depth);
    if (color, depth) != (png::ColorType::Grayscale, png::BitDepth::Sixteen) {
        return Err(bad_input(path, format!("depth must be a 16-bit grayscale png, found {depth:?} {color:?}")));
    }
    let size = reader.output_buffer_size().ok_or_else(|| bad_input(path, "png: image too large"))?;
    let mut buf = vec![0u8; size];
    let out = reader.next_frame(&mut buf).map_err(|e| bad_input(path, format!("png: {e}")))?;
    buf.truncate(out.buffer_size());
    let data: Vec<u16> = buf.chunks_exact(2).map(|b| u16::from_be_bytes([b[0], b[1]])).collect();
    if Some(data.len()) != DepthImage::expected_len(width, height) {
        return Err(bad_input(path, "png: decoded size does not match the header"));
    }
    Ok(DepthImage { width, height, data })
}

// ---------------------------------------------------------------------------------------------
// Person crop

/// A person box in image coordinates: `[x0, x1) x [y0, y1)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxF {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
}

impl BoxF {
    /// The bounding box of the given points, or `None` when there are none (or any is not finite).
    pub fn of_points(points: impl IntoIterator<Item = (f32, f32)>) -> Option<BoxF> {
        let mut b: Option<BoxF> = None;
        for (x, y) in points {
            if !(x.is_finite() && y.is_finite()) {
                continue;
            }
            b = Some(match b {
                None => BoxF { x0: x, y0: y, x1: x, y1: y },
                Some(b) => BoxF { x0: b.x0.min(x), y0: b.y0.min(y), x1: b.x1.max(x), y1: b.y1.max(y) },
            });
        }
        b
    }
}

/// Smallest side of a person box before the margin, in pixels (a box of two joints on one row still
/// gets some context).
const MIN_BOX_SIDE: f32 = 16.0;

/// An integer crop of an image and the resize applied after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Crop {
    pub x0: u32,
    pub y0: u32,
    pub width: u32,
    pub height: u32,
    /// Output size after the resize.
    pub out_width: u32,
    pub out_height: u32,
}

/// The crop of an `image_width x image_height` image around `person`: scaled by `margin` about its
/// centre (each side at least [`MIN_BOX_SIDE`] first), clamped to the image, rounded out to whole
/// pixels, then sized so the longer side is at most `max_side` (0 = keep). `None` when the box misses
/// the image.
pub fn crop_box(person: BoxF, image_width: u32, image_height: u32, margin: f32, max_side: u32) -> Option<Crop> {
    let (cx, cy) = ((person.x0 + person.x1) / 2.0, (person.y0 + person.y1) / 2.0);
    let w = (person.x1 - person.x0).max(MIN_BOX_SIDE) * margin;
    let h = (person.y1 - person.y0).max(MIN_BOX_SIDE) * margin;
    if !(cx.is_finite() && cy.is_finite() && w.is_finite() && h.is_finite()) {
        return None;
    }
    let x0 = (cx - w / 2.0).floor().max(0.0);
    let y0 = (cy - h / 2.0).floor().max(0.0);
    let x1 = (cx + w / 2.0).ceil().min(image_width as f32);
    let y1 = (cy + h / 2.0).ceil().min(image_height as f32);
    if x1 - x0 < 1.0 || y1 - y0 < 1.0 {
        return None;
    }
    let (x0, y0, width, height) = (x0 as u32, y0 as u32, (x1 - x0) as u32, (y1 - y0) as u32);
    let (mut out_width, mut out_height) = (width, height);
    let longer = width.max(height);
    if max_side > 0 && longer > max_side {
        let s = max_side as f64 / longer as f64;
        out_width = ((width as f64 * s).round() as u32).clamp(1, max_side);
        out_height = ((height as f64 * s).round() as u32).clamp(1, max_side);
    }
    Some(Crop { x0, y0, width, height, out_width, out_height })
}

impl Crop {
    fn scale(&self) -> (f32, f32) {
        (self.out_width as f32 / self.width as f32, self.out_height as f32 / self.height as f32)
    }

    /// Maps a source joint into the crop; visible = `labelled` and inside the output image.
    pub fn joint(&self, x: f32, y: f32, labelled: bool) -> Joint {
        let (sx, sy) = self.scale();
        let (x, y) = ((x - self.x0 as f32) * sx, (y - self.y0 as f32) * sy);
        let (x, y) = if x.is_finite() && y.is_finite() { (x, y) } else { (0.0, 0.0) };
        let inside = x >= 0.0 && y >= 0.0 && x < self.out_width as f32 && y < self.out_height as f32;
        Joint { x, y, visible: labelled && inside }
    }

    /// Crops and resizes RGB bilinearly (pixel centres at `i + 0.5`).
    pub fn rgb(&self, img: &RgbImage) -> RgbImage {
        let (sx, sy) = self.scale();
        let (ow, oh) = (self.out_width as usize, self.out_height as usize);
        let mut data = vec![0u8; ow * oh * 3];
        let maxx = self.x0 as f32 + self.width as f32 - 1.0;
        let maxy = self.y0 as f32 + self.height as f32 - 1.0;
        for oy in 0..oh {
            let fy = ((oy as f32 + 0.5) / sy - 0.5 + self.y0 as f32).clamp(self.y0 as f32, maxy);
            for ox in 0..ow {
                let fx = ((ox as f32 + 0.5) / sx - 0.5 + self.x0 as f32).clamp(self.x0 as f32, maxx);
                let p = bilinear(img, fx, fy);
                data[(oy * ow + ox) * 3..][..3].copy_from_slice(&p);
            }
        }
        RgbImage { width: self.out_width, height: self.out_height, data }
    }

    /// Crops and resizes depth by nearest neighbour.
    pub fn depth(&self, img: &DepthImage) -> DepthImage {
        let (sx, sy) = self.scale();
        let (ow, oh) = (self.out_width as usize, self.out_height as usize);
        let mut data = vec![0u16; ow * oh];
        for oy in 0..oh {
            let y = (self.y0 + (((oy as f32 + 0.5) / sy) as u32).min(self.height - 1)) as usize;
            for ox in 0..ow {
                let x = (self.x0 + (((ox as f32 + 0.5) / sx) as u32).min(self.width - 1)) as usize;
                data[oy * ow + ox] = img.data[y * img.width as usize + x];
            }
        }
        DepthImage { width: self.out_width, height: self.out_height, data }
    }
}

/// Bilinear sample at continuous pixel-index coordinates (clamped at the border).
pub(crate) fn bilinear(img: &RgbImage, fx: f32, fy: f32) -> [u8; 3] {
    let (w, h) = (img.width as usize, img.height as usize);
    let fx = fx.clamp(0.0, (w - 1) as f32);
    let fy = fy.clamp(0.0, (h - 1) as f32);
    let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (ax, ay) = (fx - x0 as f32, fy - y0 as f32);
    let px = |x: usize, y: usize, c: usize| f32::from(img.data[(y * w + x) * 3 + c]);
    let mut out = [0u8; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let top = px(x0, y0, c) * (1.0 - ax) + px(x1, y0, c) * ax;
        let bottom = px(x0, y1, c) * (1.0 - ax) + px(x1, y1, c) * ax;
        *o = (top * (1.0 - ay) + bottom * ay).round().clamp(0.0, 255.0) as u8;
    }
    out
}

/// A key-safe version of a source name: ASCII letters, digits, `-`, `_`; everything else `_`.
pub(crate) fn key_part(name: &str) -> String {
    let s: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    s.trim_matches('_').to_string()
}

// ---------------------------------------------------------------------------------------------
// Shard sink

/// Writes samples sequentially into `shard-00000.tar`, ... and the manifest last.
pub(crate) struct Sink<'a> {
    out_dir: PathBuf,
    opts: &'a ConvertOptions,
    source: &'static str,
    layout: KeypointLayout,
    writer: Option<ShardWriter>,
    shards: Vec<ShardEntry>,
    sizes: Option<Option<(u32, u32)>>,
    pub(crate) skipped: BTreeMap<String, u64>,
}

impl<'a> Sink<'a> {
    pub(crate) fn new(
        out_dir: &Path,
        opts: &'a ConvertOptions,
        source: &'static str,
        layout: KeypointLayout,
    ) -> Result<Sink<'a>, DataError> {
        opts.validate()?;
        std::fs::create_dir_all(out_dir).map_err(|e| DataError::io(out_dir, e))?;
        Ok(Sink {
            out_dir: out_dir.to_path_buf(),
            opts,
            source,
            layout,
            writer: None,
            shards: Vec::new(),
            sizes: None,
            skipped: BTreeMap::new(),
        })
    }

    pub(crate) fn skip(&mut self, reason: impl Into<String>) {
        *self.skipped.entry(reason.into()).or_insert(0) += 1;
    }

    pub(crate) fn append(&mut self, sample: &Sample) -> Result<(), DataError> {
        let size = (sample.rgb.width, sample.rgb.height);
        self.sizes = Some(match self.sizes {
            None => Some(size),
            Some(Some(s)) if s == size => Some(s),
            Some(_) => None,
        });
        if self.writer.is_none() {
            let name = format!("shard-{:05}.tar", self.shards.len());
            self.writer = Some(ShardWriter::create(self.out_dir.join(name))?.with_source(self.source));
        }
        let writer = self.writer.as_mut().ok_or_else(|| bad_input(&self.out_dir, "no shard writer"))?;
        writer.append(sample)?;
        if writer.len() >= self.opts.shard_size {
            self.close_shard()?;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<(), DataError> {
        if let Some(writer) = self.writer.take() {
            let path = writer.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let s = writer.finish()?;
            self.shards.push(ShardEntry { path, samples: s.samples, with_depth: s.with_depth, sha256: s.sha256 });
        }
        Ok(())
    }

    /// Closes the last shard and writes `manifest.json`. An empty conversion is an error naming
    /// `source_path` and the skip counts.
    pub(crate) fn finish(mut self, source_path: &Path) -> Result<ConvertReport, DataError> {
        self.close_shard()?;
        let samples: u64 = self.shards.iter().map(|s| s.samples).sum();
        if samples == 0 {
            return Err(bad_input(source_path, format!("no samples converted (skipped: {:?})", self.skipped)));
        }
        let with_depth: u64 = self.shards.iter().map(|s| s.with_depth).sum();
        let mut modalities = vec!["rgb".to_string()];
        if with_depth > 0 {
            modalities.push("depth".to_string());
        }
        modalities.push("kp2d".to_string());
        let (image_width, image_height) = self.sizes.flatten().unwrap_or((0, 0));
        let manifest = Manifest {
            format: MANIFEST_FORMAT.to_string(),
            name: self.opts.name.clone(),
            layout: self.layout,
            image_width,
            image_height,
            modalities,
            samples,
            shards: self.shards,
        };
        manifest.save(self.out_dir.join("manifest.json"))?;
        Ok(ConvertReport { samples, with_depth, skipped: self.skipped, manifest })
    }
}

#[cfg(test)]
pub(crate) mod test_util;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_expands_clamps_and_resizes() {
        let b = BoxF { x0: 40.0, y0: 20.0, x1: 60.0, y1: 80.0 };
        let c = crop_box(b, 100, 90, 1.5, 0).expect("crop");
        assert_eq!((c.x0, c.y0, c.width, c.height), (35, 5, 30, 85));
        let j = c.joint(50.0, 50.0, true);
        assert_eq!((j.x, j.y, j.visible), (15.0, 45.0, true));
        assert!(!c.joint(10.0, 50.0, true).visible);
        assert!(!c.joint(50.0, 50.0, false).visible);
        let r = crop_box(b, 100, 90, 1.5, 40).expect("crop");
        assert_eq!((r.out_width, r.out_height), (14, 40));
        let j = r.joint(65.0, 5.0, true);
        assert!((j.x - 14.0).abs() < 1e-4 && j.y.abs() < 1e-4 && !j.visible);
        assert!(crop_box(BoxF { x0: 200.0, y0: 200.0, x1: 300.0, y1: 300.0 }, 100, 90, 1.0, 0).is_none());
    }

    #[test]
    fn rgb_crop_without_resize_copies_pixels() {
        let img = RgbImage { width: 4, height: 3, data: (0..36).collect() };
        let c = Crop { x0: 1, y0: 1, width: 2, height: 2, out_width: 2, out_height: 2 };
        let out = c.rgb(&img);
        assert_eq!(out.pixel(0, 0), img.pixel(1, 1));
        assert_eq!(out.pixel(1, 1), img.pixel(2, 2));
        let d = DepthImage { width: 4, height: 3, data: (0..12).collect() };
        assert_eq!(c.depth(&d).data, vec![5, 6, 9, 10]);
    }
}
