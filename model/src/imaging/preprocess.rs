//! CLIP preprocessing as LLaVA does it: RGB, pad to a square with the CLIP-mean background (image
//! centred, no jitter), Pillow-compatible bicubic resize, x/255, per-channel normalisation, CHW.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use image::{DynamicImage, ImageReader, RgbImage};

use super::resize::resize_bicubic;
use crate::error::{Error, Result};

/// CLIP's normalisation mean (OpenAI).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's normalisation standard deviation (OpenAI).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Decodes a PNG/JPEG (any format the `image` crate reads) from a file.
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    load_image_bytes(&bytes, path)
}

/// Decodes image bytes; `origin` names them in errors.
pub fn load_image_bytes(bytes: &[u8], origin: &Path) -> Result<DynamicImage> {
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::image(origin, format!("cannot read: {e}")))?;
    let format = reader.format();
    if format.is_none() {
        return Err(Error::image(
            origin,
            "not a recognised image format (PNG or JPEG expected)",
        ));
    }
    // The `image` decoders validate the file and return errors rather than panicking.
    let decoded = reader
        .decode()
        .map_err(|e| Error::image(origin, format!("cannot decode image: {e}")))?;
    if format == Some(image::ImageFormat::Jpeg) {
        // Pillow decodes JPEG with libjpeg-turbo; decode the same way so the model sees the same pixels.
        if let Some(exact) = decode_jpeg_like_pillow(bytes, &decoded) {
            return Ok(exact);
        }
    }
    Ok(decoded)
}

/// libjpeg-turbo decoding (ISLOW IDCT, fancy upsampling), `None` when it cannot handle the file (e.g.
/// CMYK), in which case the already decoded image is used. mozjpeg reports fatal errors by unwinding.
fn decode_jpeg_like_pillow(bytes: &[u8], decoded: &DynamicImage) -> Option<DynamicImage> {
    let grey = matches!(decoded, DynamicImage::ImageLuma8(_));
    let (w, h) = (decoded.width(), decoded.height());
    super::guard::contain(|| {
        let d = mozjpeg::Decompress::new_mem(bytes).ok()?;
        if grey {
            let mut s = d.grayscale().ok()?;
            let px: Vec<u8> = s.read_scanlines::<u8>().ok()?;
            image::GrayImage::from_raw(w, h, px).map(DynamicImage::ImageLuma8)
        } else {
            let mut s = d.rgb().ok()?;
            let px: Vec<[u8; 3]> = s.read_scanlines().ok()?;
            image::RgbImage::from_raw(w, h, px.into_iter().flatten().collect())
                .map(DynamicImage::ImageRgb8)
        }
    })
    .ok()
    .flatten()
}

/// The preprocessing of one vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocess {
    /// Output side in pixels.
    pub size: usize,
    /// Per-channel mean.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

impl ClipPreprocess {
    /// OpenAI CLIP's statistics at `size` pixels.
    pub fn openai(size: usize) -> Self {
        Self {
            size,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// The padding colour: floor(255 × mean), (122, 116, 104) for OpenAI CLIP.
    pub fn background(&self) -> [u8; 3] {
        self.mean.map(|m| (m * 255.0) as u8)
    }

    /// The 8-bit square image the model sees (padded and resized), before normalisation.
    pub fn square(&self, img: &DynamicImage) -> RgbImage {
        let rgb = img.to_rgb8();
        let (w, h) = rgb.dimensions();
        let padded = if w == h {
            rgb
        } else {
            let side = w.max(h);
            let mut canvas = RgbImage::from_pixel(side, side, image::Rgb(self.background()));
            image::imageops::replace(
                &mut canvas,
                &rgb,
                i64::from((side - w) / 2),
                i64::from((side - h) / 2),
            );
            canvas
        };
        resize_bicubic(&padded, self.size, self.size)
    }

    /// Normalised CHW values of an 8-bit square image.
    pub fn normalise(&self, square: &RgbImage) -> Vec<f32> {
        let n = (square.width() * square.height()) as usize;
        let mut out = vec![0.0f32; 3 * n];
        for (i, p) in square.pixels().enumerate() {
            for c in 0..3 {
                out[c * n + i] = (f32::from(p.0[c]) / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }

    /// Pixel values `[3, size, size]` for one image.
    pub fn pixel_values(&self, img: &DynamicImage) -> Vec<f32> {
        self.normalise(&self.square(img))
    }

    /// A batch `[n, 3, size, size]` on `device` (f32; the model casts to its own type).
    pub fn batch(&self, images: &[DynamicImage], device: &Device) -> Tensor<4> {
        let values: Vec<f32> = images.iter().flat_map(|i| self.pixel_values(i)).collect();
        Tensor::from_data(
            TensorData::new(values, [images.len(), 3, self.size, self.size]),
            (device, burn::tensor::DType::F32),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_is_clip_mean_floor() {
        assert_eq!(ClipPreprocess::openai(336).background(), [122, 116, 104]);
    }

    #[test]
    fn unreadable_image_names_the_file() {
        let e = load_image_bytes(b"not an image", Path::new("scan.png"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("scan.png:"), "{e}");
        let e = load_image(Path::new("/nonexistent/x.png"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/x.png"), "{e}");
    }
}
