//! Decoded frame + window → the 8-bit image the clinician sees (and the model is given).

use image::{DynamicImage, GrayImage, RgbImage};

use super::pixels::{Frame, Photometric};
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
