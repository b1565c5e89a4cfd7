//! Decoded frame + window → the 8-bit image the clinician sees (and the model is given).

use image::{DynamicImage, GrayImage, RgbImage};

use super::pixels::{Frame, Lut, Photometric};
use super::window::Window;

/// Renders `frame`: grey frames through `window` (MONOCHROME1 inverted afterwards), RGB frames scaled from
/// their stored bit depth to 8 bits (the window does not apply).
pub fn render(frame: &Frame, window: Window) -> DynamicImage {
    let (w, h) = (frame.width, frame.height);
    match frame.photometric {
        Photometric::Monochrome2 | Photometric::Monochrome1 => {
            let invert = frame.photometric == Photometric::Monochrome1;
            let px = frame
                .values
                .iter()
                .map(|&x| {
                    let y = window.apply(x);
                    if invert { 255 - y } else { y }
                })
                .collect();
            DynamicImage::ImageLuma8(GrayImage::from_raw(w, h, px).expect("frame size checked"))
        }
        Photometric::Rgb => {
            let max = ((1u64 << frame.bits_stored.min(32)) - 1) as f32;
            let px = frame
                .values
                .iter()
                .map(|&x| ((x / max).clamp(0.0, 1.0) * 255.0).round() as u8)
                .collect();
            DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, px).expect("frame size checked"))
        }
    }
}

/// Renders a grey `frame` through a VOI LUT: y = LUT(x) × 255 / (2^bits − 1), rounded half up (MONOCHROME1
/// inverted afterwards). Modality values are rounded to the nearest integer before the lookup.
pub fn render_voi_lut(frame: &Frame, lut: &Lut) -> DynamicImage {
    let invert = frame.photometric == Photometric::Monochrome1;
    let scale = 255.0 / lut.max_output();
    let px = frame
        .values
        .iter()
        .map(|&x| {
            let v = f64::from(lut.get(f64::from(x).round() as i64)) * scale;
            let y = (v.clamp(0.0, 255.0) + 0.5).floor() as u8;
            if invert { 255 - y } else { y }
        })
        .collect();
    DynamicImage::ImageLuma8(
        GrayImage::from_raw(frame.width, frame.height, px).expect("frame size checked"),
    )
}
