//! Fixture helpers for the converter tests.

use std::path::Path;

/// Writes an 8-bit RGB PNG whose pixel `(x, y)` is `f(x, y)`.
pub(crate) fn write_rgb_png(path: &Path, width: u32, height: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    let data: Vec<u8> = (0..height).flat_map(|y| (0..width).map(move |x| (x, y))).flat_map(|(x, y)| f(x, y)).collect();
    write_png(path, width, height, png::ColorType::Rgb, png::BitDepth::Eight, &data);
}

/// Writes a 16-bit grayscale PNG.
pub(crate) fn write_depth_png(path: &Path, width: u32, height: u32, data: &[u16]) {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_be_bytes()).collect();
    write_png(path, width, height, png::ColorType::Grayscale, png::BitDepth::Sixteen, &bytes);
}

fn write_png(path: &Path, width: u32, height: u32, color: png::ColorType, depth: png::BitDepth, data: &[u8]) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    let file = std::fs::File::create(path).expect("create png");
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    enc.set_color(color);
    enc.set_depth(depth);
    let mut w = enc.write_header().expect("png header");
    w.write_image_data(data).expect("png data");
    w.finish().expect("png finish");
}

/// Writes an RGB JPEG (quality 95).
pub(crate) fn write_rgb_jpeg(path: &Path, width: u16, height: u16, f: impl Fn(u32, u32) -> [u8; 3]) {
    let data: Vec<u8> = (0..u32::from(height))
        .flat_map(|y| (0..u32::from(width)).map(move |x| (x, y)))
        .flat_map(|(x, y)| f(x, y))
        .collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    let enc = jpeg_encoder::Encoder::new_file(path, 95).expect("jpeg file");
    enc.encode(&data, width, height, jpeg_encoder::ColorType::Rgb).expect("jpeg encode");
}
