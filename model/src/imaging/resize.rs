//! Bicubic resampling bit-compatible with Pillow's `Image.resize(..., BICUBIC)` on 8-bit images: a = -0.5,
//! support widened by the downscale factor (antialiased), coefficients in 22-bit fixed point, and the
//! horizontal pass rounded to 8 bits before the vertical pass. Generic Catmull-Rom resizers differ from it
//! when downscaling, and LLaVA was trained on Pillow's output.

use image::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index and fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn coefficients(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero; clamp afterwards as Pillow does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let k: Vec<f64> = (0..xmax)
            .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss))
            .collect();
        let total: f64 = k.iter().sum();
        for (x, w) in k.iter().enumerate() {
            let w = if total != 0.0 { w / total } else { *w };
            let scaled = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if w < 0.0 {
                (scaled - 0.5) as i32
            } else {
                (scaled + 0.5) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs {
        bounds,
        ksize,
        weights,
    }
}

fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One separable pass over interleaved 8-bit channels; `horizontal` picks the axis.
fn pass(src: &[u8], w: usize, h: usize, ch: usize, out_len: usize, horizontal: bool) -> Vec<u8> {
    let (in_len, lines) = if horizontal { (w, h) } else { (h, w) };
    let c = coefficients(in_len, out_len);
    let (ow, oh) = if horizontal {
        (out_len, h)
    } else {
        (w, out_len)
    };
    let mut out = vec![0u8; ow * oh * ch];
    for line in 0..lines {
        for (o, &(start, count)) in c.bounds.iter().enumerate() {
            let k = &c.weights[o * c.ksize..o * c.ksize + count];
            for channel in 0..ch {
                let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                for (j, &kw) in k.iter().enumerate() {
                    let idx = if horizontal {
                        (line * w + start + j) * ch
                    } else {
                        ((start + j) * w + line) * ch
                    };
                    acc += i32::from(src[idx + channel]) * kw;
                }
                let oidx = if horizontal {
                    (line * ow + o) * ch
                } else {
                    (o * ow + line) * ch
                };
                out[oidx + channel] = clip8(acc);
            }
        }
    }
    out
}

/// Resizes an RGB image to `width` × `height` like Pillow's bicubic `resize`.
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (mut w, mut h) = (img.width() as usize, img.height() as usize);
    let mut buf = img.as_raw().clone();
    if w != width {
        buf = pass(&buf, w, h, 3, width, true);
        w = width;
    }
    if h != height {
        buf = pass(&buf, w, h, 3, height, false);
        h = height;
    }
    RgbImage::from_raw(w as u32, h as u32, buf).expect("buffer size matches")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_a_copy_and_constant_stays_constant() {
        let img = RgbImage::from_pixel(17, 9, image::Rgb([10, 200, 77]));
        assert_eq!(resize_bicubic(&img, 17, 9), img);
        let down = resize_bicubic(&img, 5, 3);
        assert!(down.pixels().all(|p| p.0 == [10, 200, 77]));
        let up = resize_bicubic(&img, 40, 31);
        assert!(up.pixels().all(|p| p.0 == [10, 200, 77]));
    }
}
