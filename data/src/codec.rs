//! Member codecs: RGB PNG or JPEG, 16-bit depth PNG, 8-bit part-label PNG, `kp2d.json`, `meta.json`.
//!
//! Decoders take the shard path and sample key so that every error names them.

use std::io::Cursor;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::layout::{KeypointLayout, MAX_PART_LABEL};
use crate::sample::{DepthImage, Joint, LabelImage, RgbImage};

/// Member suffixes (`KEY.<suffix>`).
pub(crate) const RGB_MEMBER: &str = "rgb.png";
pub(crate) const RGB_JPEG_MEMBER: &str = "rgb.jpg";
pub(crate) const DEPTH_MEMBER: &str = "depth.png";
pub(crate) const PARTS_MEMBER: &str = "parts.png";
pub(crate) const KP2D_MEMBER: &str = "kp2d.json";
pub(crate) const META_MEMBER: &str = "meta.json";

/// Largest image side accepted by the decoders (a guard against decompression bombs).
pub(crate) const MAX_IMAGE_SIDE: u32 = 16_384;

/// Where a member came from, for error messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub shard: &'a Path,
    pub key: &'a str,
}

impl Ctx<'_> {
    fn corrupt_png(&self, member: &str, detail: impl ToString) -> DataError {
        DataError::CorruptPng {
            shard: self.shard.to_path_buf(),
            key: self.key.to_string(),
            member: member.to_string(),
            detail: detail.to_string(),
        }
    }

    fn corrupt_jpeg(&self, member: &str, detail: impl ToString) -> DataError {
        DataError::CorruptJpeg {
            shard: self.shard.to_path_buf(),
            key: self.key.to_string(),
            member: member.to_string(),
            detail: detail.to_string(),
        }
    }

    fn bad_json(&self, member: &str, detail: impl ToString) -> DataError {
        DataError::BadJson {
            shard: self.shard.to_path_buf(),
            key: self.key.to_string(),
            member: member.to_string(),
            detail: detail.to_string(),
        }
    }

    pub(crate) fn field(&self, field: impl Into<String>, detail: impl Into<String>) -> DataError {
        DataError::SampleField {
            shard: self.shard.to_path_buf(),
            key: self.key.to_string(),
            field: field.into(),
            detail: detail.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PNG

fn encode_png(
    width: u32,
    height: u32,
    color: png::ColorType,
    depth: png::BitDepth,
    data: &[u8],
) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(color);
    enc.set_depth(depth);
    enc.set_compression(png::Compression::Fast);
    let mut writer = enc.write_header()?;
    writer.write_image_data(data)?;
    writer.finish()?;
    Ok(out)
}

/// Encodes an 8-bit RGB PNG. The caller has checked `data.len()`.
pub(crate) fn encode_rgb_png(img: &RgbImage) -> Result<Vec<u8>, png::EncodingError> {
    encode_png(img.width, img.height, png::ColorType::Rgb, png::BitDepth::Eight, &img.data)
}

/// Encodes a 16-bit grayscale PNG (big-endian samples, as PNG requires).
pub(crate) fn encode_depth_png(img: &DepthImage) -> Result<Vec<u8>, png::EncodingError> {
    let bytes: Vec<u8> = img.data.iter().flat_map(|v| v.to_be_bytes()).collect();
    encode_png(img.width, img.height, png::ColorType::Grayscale, png::BitDepth::Sixteen, &bytes)
}

fn describe(color: png::ColorType, depth: png::BitDepth) -> String {
    let bits = match depth {
        png::BitDepth::One => 1,
        png::BitDepth::Two => 2,
        png::BitDepth::Four => 4,
        png::BitDepth::Eight => 8,
        png::BitDepth::Sixteen => 16,
    };
    let color = match color {
        png::ColorType::Grayscale => "grayscale",
        png::ColorType::Rgb => "rgb",
        png::ColorType::Indexed => "indexed",
        png::ColorType::GrayscaleAlpha => "grayscale+alpha",
        png::ColorType::Rgba => "rgba",
    };
    format!("{bits}-bit {color}")
}

/// Decodes one PNG that must have the given colour type and bit depth; returns (width, height, bytes).
fn decode_png(
    bytes: &[u8],
    ctx: Ctx<'_>,
    member: &str,
    want: (png::ColorType, png::BitDepth),
    expected: &'static str,
) -> Result<(u32, u32, Vec<u8>), DataError> {
    let limits = png::Limits { bytes: 1 << 30 };
    let decoder = png::Decoder::new_with_limits(Cursor::new(bytes), limits);
    let mut reader = decoder.read_info().map_err(|e| ctx.corrupt_png(member, e))?;
    let (width, height, color, depth) = {
        let info = reader.info();
        (info.width, info.height, info.color_type, info.bit_depth)
    };
    if (color, depth) != want {
        return Err(DataError::PngFormat {
            shard: ctx.shard.to_path_buf(),
            key: ctx.key.to_string(),
            member: member.to_string(),
            expected,
            found: describe(color, depth),
        });
    }
    if width == 0 || height == 0 || width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
        return Err(ctx.corrupt_png(member, format!("unsupported size {width}x{height}")));
    }
    let size = reader.output_buffer_size().ok_or_else(|| ctx.corrupt_png(member, "image too large"))?;
    let mut buf = vec![0u8; size];
    let out = reader.next_frame(&mut buf).map_err(|e| ctx.corrupt_png(member, e))?;
    buf.truncate(out.buffer_size());
    Ok((width, height, buf))
}

/// Decodes `KEY.rgb.png`: must be 8-bit RGB.
pub(crate) fn decode_rgb_png(bytes: &[u8], ctx: Ctx<'_>) -> Result<RgbImage, DataError> {
    let want = (png::ColorType::Rgb, png::BitDepth::Eight);
    let (width, height, data) = decode_png(bytes, ctx, RGB_MEMBER, want, "8-bit rgb")?;
    if Some(data.len()) != RgbImage::expected_len(width, height) {
        return Err(ctx.corrupt_png(RGB_MEMBER, "decoded size does not match the header"));
    }
    Ok(RgbImage { width, height, data })
}

/// Decodes `KEY.depth.png`: must be 16-bit grayscale (millimetres).
pub(crate) fn decode_depth_png(bytes: &[u8], ctx: Ctx<'_>) -> Result<DepthImage, DataError> {
    let want = (png::ColorType::Grayscale, png::BitDepth::Sixteen);
    let (width, height, raw) = decode_png(bytes, ctx, DEPTH_MEMBER, want, "16-bit grayscale")?;
    let data: Vec<u16> = raw.chunks_exact(2).map(|b| u16::from_be_bytes([b[0], b[1]])).collect();
    if Some(data.len()) != DepthImage::expected_len(width, height) {
        return Err(ctx.corrupt_png(DEPTH_MEMBER, "decoded size does not match the header"));
    }
    Ok(DepthImage { width, height, data })
}

/// Encodes `KEY.parts.png`: 8-bit grayscale, one label per pixel. The caller has checked the labels.
pub(crate) fn encode_parts_png(img: &LabelImage) -> Result<Vec<u8>, png::EncodingError> {
    encode_png(img.width, img.height, png::ColorType::Grayscale, png::BitDepth::Eight, &img.data)
}

/// Decodes `KEY.parts.png`: must be 8-bit grayscale with every value at most [`MAX_PART_LABEL`].
pub(crate) fn decode_parts_png(bytes: &[u8], ctx: Ctx<'_>) -> Result<LabelImage, DataError> {
    let want = (png::ColorType::Grayscale, png::BitDepth::Eight);
    let (width, height, data) = decode_png(bytes, ctx, PARTS_MEMBER, want, "8-bit grayscale")?;
    if Some(data.len()) != LabelImage::expected_len(width, height) {
        return Err(ctx.corrupt_png(PARTS_MEMBER, "decoded size does not match the header"));
    }
    if let Some(i) = data.iter().position(|&v| v > MAX_PART_LABEL) {
        return Err(DataError::PartLabel {
            shard: ctx.shard.to_path_buf(),
            key: ctx.key.to_string(),
            member: PARTS_MEMBER.to_string(),
            label: data[i],
            x: (i % width as usize) as u32,
            y: (i / width as usize) as u32,
            max: MAX_PART_LABEL,
        });
    }
    Ok(LabelImage { width, height, data })
}

// ---------------------------------------------------------------------------------------------
// JPEG

/// Encodes an 8-bit RGB JPEG at `quality` (1..=100), without chroma subsampling. The caller has
/// checked `data.len()` and that the sides fit in 16 bits.
pub(crate) fn encode_rgb_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>, String> {
    let (Ok(w), Ok(h)) = (u16::try_from(img.width), u16::try_from(img.height)) else {
        return Err(format!("{}x{} is too large for jpeg", img.width, img.height));
    };
    let mut out = Vec::with_capacity(img.data.len() / 4 + 1024);
    let mut enc = jpeg_encoder::Encoder::new(&mut out, quality);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_1_1);
    enc.encode(&img.data, w, h, jpeg_encoder::ColorType::Rgb).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Decodes `KEY.rgb.jpg` into 8-bit RGB (grayscale JPEGs are expanded to RGB).
pub(crate) fn decode_rgb_jpeg(bytes: &[u8], ctx: Ctx<'_>) -> Result<RgbImage, DataError> {
    use zune_jpeg::zune_core::bytestream::ZCursor;
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;

    let side = MAX_IMAGE_SIDE as usize;
    let options =
        DecoderOptions::default().set_max_width(side).set_max_height(side).jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    decoder.decode_headers().map_err(|e| ctx.corrupt_jpeg(RGB_JPEG_MEMBER, format!("{e:?}")))?;
    let info = decoder.info().ok_or_else(|| ctx.corrupt_jpeg(RGB_JPEG_MEMBER, "no image header"))?;
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    if width == 0 || height == 0 {
        return Err(ctx.corrupt_jpeg(RGB_JPEG_MEMBER, format!("unsupported size {width}x{height}")));
    }
    let data = decoder.decode().map_err(|e| ctx.corrupt_jpeg(RGB_JPEG_MEMBER, format!("{e:?}")))?;
    if Some(data.len()) != RgbImage::expected_len(width, height) {
        return Err(
            ctx.corrupt_jpeg(RGB_JPEG_MEMBER, format!("decoded {} bytes, expected {width}x{height}x3", data.len()))
        );
    }
    Ok(RgbImage { width, height, data })
}

// ---------------------------------------------------------------------------------------------
// kp2d.json

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Kp2dJson {
    layout: KeypointLayout,
    /// `[x, y, v]` per joint, v = 0 (invisible) or 1 (visible).
    joints: Vec<(f32, f32, u8)>,
}

/// Encodes `{"layout":"mpii16","joints":[[x,y,v],...]}`. Coordinates must be finite (JSON has no
/// NaN/inf); the writer checks that before calling.
pub(crate) fn encode_kp2d(layout: KeypointLayout, joints: &[Joint]) -> Vec<u8> {
    let doc = Kp2dJson { layout, joints: joints.iter().map(|j| (j.x, j.y, u8::from(j.visible))).collect() };
    // Serialising plain numbers, strings and a unit enum into a Vec cannot fail.
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// Decodes a `kp2d.json` member and checks the joint count against its layout.
pub(crate) fn decode_kp2d(bytes: &[u8], ctx: Ctx<'_>) -> Result<(KeypointLayout, Vec<Joint>), DataError> {
    let doc: Kp2dJson = serde_json::from_slice(bytes).map_err(|e| ctx.bad_json(KP2D_MEMBER, e))?;
    let expected = doc.layout.num_joints();
    if doc.joints.len() != expected {
        return Err(DataError::JointCount {
            shard: ctx.shard.to_path_buf(),
            key: ctx.key.to_string(),
            layout: doc.layout,
            expected,
            found: doc.joints.len(),
        });
    }
    let mut joints = Vec::with_capacity(expected);
    for (i, &(x, y, v)) in doc.joints.iter().enumerate() {
        if !x.is_finite() || !y.is_finite() {
            return Err(ctx.field(format!("kp2d.json joints[{i}]"), "coordinates must be finite"));
        }
        let visible = match v {
            0 => false,
            1 => true,
            other => {
                return Err(
                    ctx.field(format!("kp2d.json joints[{i}][2]"), format!("visibility must be 0 or 1, found {other}"))
                );
            }
        };
        joints.push(Joint { x, y, visible });
    }
    Ok((doc.layout, joints))
}

// ---------------------------------------------------------------------------------------------
// meta.json

/// `{"key":..., "has_depth":bool, "source":"synthetic"}`. Unknown fields are tolerated (converters
/// may record provenance); `key` and `has_depth` are checked against the sample.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct MetaJson {
    pub key: String,
    pub has_depth: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

pub(crate) fn encode_meta(key: &str, has_depth: bool, source: &str) -> Vec<u8> {
    let doc = MetaJson { key: key.to_string(), has_depth, source: Some(source.to_string()) };
    serde_json::to_vec(&doc).unwrap_or_default()
}

pub(crate) fn decode_meta(bytes: &[u8], ctx: Ctx<'_>) -> Result<MetaJson, DataError> {
    serde_json::from_slice(bytes).map_err(|e| ctx.bad_json(META_MEMBER, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ctx() -> Ctx<'static> {
        Ctx { shard: Path::new("s.tar"), key: "k" }
    }

    #[test]
    fn png_round_trip() {
        let rgb = RgbImage { width: 3, height: 2, data: (0..18).map(|v| v * 13).collect() };
        let back = decode_rgb_png(&encode_rgb_png(&rgb).expect("encode"), ctx()).expect("decode");
        assert_eq!(back, rgb);
        let depth = DepthImage { width: 3, height: 2, data: vec![0, 1, 255, 256, 4500, u16::MAX] };
        let back = decode_depth_png(&encode_depth_png(&depth).expect("encode"), ctx()).expect("decode");
        assert_eq!(back, depth);
    }

    #[test]
    fn png_wrong_kind_is_named() {
        let rgb = RgbImage { width: 2, height: 2, data: vec![7; 12] };
        let bytes = encode_rgb_png(&rgb).expect("encode");
        let err = decode_depth_png(&bytes, ctx()).expect_err("rgb is not depth");
        let msg = err.to_string();
        assert!(msg.contains("16-bit grayscale") && msg.contains("8-bit rgb"), "{msg}");
    }

    #[test]
    fn kp2d_rejects_bad_visibility_and_unknown_fields() {
        let mut doc = String::from(r#"{"layout":"coco13","joints":["#);
        for i in 0..13 {
            doc.push_str(if i == 0 { "[1,2,2]" } else { ",[1,2,0]" });
        }
        doc.push_str("]}");
        let err = decode_kp2d(doc.as_bytes(), ctx()).expect_err("v = 2");
        assert!(err.to_string().contains("joints[0][2]"), "{err}");
        let err = decode_kp2d(br#"{"layout":"coco13","joints":[],"extra":1}"#, ctx()).expect_err("unknown field");
        assert!(err.to_string().contains("extra"), "{err}");
    }

    fn joints_strategy() -> impl Strategy<Value = (KeypointLayout, Vec<Joint>)> {
        prop_oneof![Just(KeypointLayout::Mpii16), Just(KeypointLayout::Coco13)].prop_flat_map(|layout| {
            let joint = (
                prop_oneof![any::<f32>().prop_filter("finite", |v| v.is_finite()), -1e4f32..1e4],
                prop_oneof![any::<f32>().prop_filter("finite", |v| v.is_finite()), -1e4f32..1e4],
                any::<bool>(),
            )
                .prop_map(|(x, y, visible)| Joint { x, y, visible });
            (Just(layout), proptest::collection::vec(joint, layout.num_joints()))
        })
    }

    proptest! {
        #[test]
        fn kp2d_round_trip((layout, joints) in joints_strategy()) {
            let bytes = encode_kp2d(layout, &joints);
            let (back_layout, back) = decode_kp2d(&bytes, ctx()).expect("decode");
            prop_assert_eq!(back_layout, layout);
            // bit-exact, including the sign of zero
            prop_assert_eq!(back.len(), joints.len());
            for (a, b) in back.iter().zip(&joints) {
                prop_assert_eq!(a.x.to_bits(), b.x.to_bits());
                prop_assert_eq!(a.y.to_bits(), b.y.to_bits());
                prop_assert_eq!(a.visible, b.visible);
            }
        }

        #[test]
        fn kp2d_wrong_count_is_rejected(n in 0usize..40) {
            prop_assume!(n != 16);
            let joints = vec![Joint { x: 1.0, y: 2.0, visible: true }; n];
            let bytes = encode_kp2d(KeypointLayout::Mpii16, &joints);
            let err = decode_kp2d(&bytes, ctx()).expect_err("wrong count");
            let is_joint_count = matches!(err, DataError::JointCount { expected: 16, found, .. } if found == n);
            prop_assert!(is_joint_count);
        }
    }

    fn labels_strategy() -> impl Strategy<Value = LabelImage> {
        (1u32..40, 1u32..40).prop_flat_map(|(w, h)| {
            proptest::collection::vec(0u8..=MAX_PART_LABEL, (w * h) as usize).prop_map(move |data| LabelImage {
                width: w,
                height: h,
                data,
            })
        })
    }

    /// A smooth random image: a bilinear blend of four random corner colours plus a little noise.
    fn smooth_strategy() -> impl Strategy<Value = RgbImage> {
        (8u32..48, 8u32..48, proptest::array::uniform12(0u8..=255), any::<u64>()).prop_map(|(w, h, c, seed)| {
            let mut noise = seed;
            let mut data = Vec::with_capacity((w * h * 3) as usize);
            for y in 0..h {
                for x in 0..w {
                    let (fx, fy) = (x as f32 / (w - 1) as f32, y as f32 / (h - 1) as f32);
                    for k in 0..3 {
                        let top = f32::from(c[k]) * (1.0 - fx) + f32::from(c[3 + k]) * fx;
                        let bottom = f32::from(c[6 + k]) * (1.0 - fx) + f32::from(c[9 + k]) * fx;
                        noise = noise.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let jitter = ((noise >> 61) as f32) - 3.5;
                        data.push((top * (1.0 - fy) + bottom * fy + jitter).round().clamp(0.0, 255.0) as u8);
                    }
                }
            }
            RgbImage { width: w, height: h, data }
        })
    }

    proptest! {
        #[test]
        fn parts_png_round_trip(labels in labels_strategy()) {
            let back = decode_parts_png(&encode_parts_png(&labels).expect("encode"), ctx()).expect("decode");
            prop_assert_eq!(back, labels);
        }

        #[test]
        fn parts_png_out_of_range_is_rejected(mut labels in labels_strategy(), at in any::<prop::sample::Index>(), bad in 15u8..) {
            let i = at.index(labels.data.len());
            labels.data[i] = bad;
            let err = decode_parts_png(&encode_parts_png(&labels).expect("encode"), ctx()).expect_err("label > 14");
            let (x, y) = ((i % labels.width as usize) as u32, (i / labels.width as usize) as u32);
            let named = matches!(err, DataError::PartLabel { label, x: ex, y: ey, .. } if label == bad && ex == x && ey == y);
            prop_assert!(named, "{}", err);
        }

        #[test]
        fn jpeg_round_trip_within_tolerance(img in smooth_strategy(), quality in 90u8..=100) {
            let back = decode_rgb_jpeg(&encode_rgb_jpeg(&img, quality).expect("encode"), ctx()).expect("decode");
            prop_assert_eq!((back.width, back.height), (img.width, img.height));
            let sum: u64 = back.data.iter().zip(&img.data).map(|(&a, &b)| u64::from(a.abs_diff(b))).sum();
            let mae = sum as f64 / img.data.len() as f64;
            prop_assert!(mae < 4.0, "quality {}: mean abs error {}", quality, mae);
        }
    }
}
