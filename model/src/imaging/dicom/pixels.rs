//! Decoding one frame into modality values (after rescale slope/intercept), with dicom-rs doing only the
//! codec work: its own normalisation is not used (it gets signed images with negative values wrong).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::DefaultDicomObject;
use dicom_pixeldata::PixelDecoder;

use super::attr;
use crate::error::{Error, Result};

/// Largest decoded frame accepted by default: 1 GiB.
pub const DEFAULT_MAX_FRAME_BYTES: u64 = 1 << 30;

/// How the samples of a frame are to be shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Photometric {
    /// Grey, low values dark.
    Monochrome2,
    /// Grey, low values bright (shown inverted).
    Monochrome1,
    /// Three samples per pixel, already RGB after decoding.
    Rgb,
}

/// One decoded frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// How to show it.
    pub photometric: Photometric,
    /// Bits stored per sample.
    pub bits_stored: u16,
    /// Modality values (stored value × slope + intercept; HU for CT), row-major, samples interleaved.
    pub values: Vec<f32>,
    /// The file's first VOI window (center, width), if any.
    pub file_window: Option<(f64, f64)>,
}

/// Decodes frame `index` (0-based) of `obj`, refusing frames larger than `max_bytes` once decoded.
pub fn decode_frame(
    path: &Path,
    obj: &DefaultDicomObject,
    index: u32,
    max_bytes: u64,
) -> Result<Frame> {
    let err = |m: String| Error::image(path, m);
    let req = |tag, name: &str| {
        attr::int(obj, tag).ok_or_else(|| err(format!("missing or invalid {name}")))
    };
    let rows = req(tags::ROWS, "Rows")?;
    let cols = req(tags::COLUMNS, "Columns")?;
    let samples = attr::int(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    let bits_allocated = req(tags::BITS_ALLOCATED, "BitsAllocated")?;
    let bits_stored = attr::int(obj, tags::BITS_STORED).unwrap_or(bits_allocated);
    let signed = attr::int(obj, tags::PIXEL_REPRESENTATION) == Some(1);
    let frames = attr::int(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1);
    let photometric_name = attr::string(obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default();
    if obj.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        return Err(err("no pixel data (not an image)".into()));
    }
    if rows <= 0 || cols <= 0 || rows > 65535 || cols > 65535 {
        return Err(err(format!("invalid image size {cols}×{rows}")));
    }
    if !matches!(bits_allocated, 8 | 16 | 32) || bits_stored <= 0 || bits_stored > bits_allocated {
        return Err(err(format!(
            "unsupported sample size: {bits_stored} bits stored in {bits_allocated}"
        )));
    }
    if i64::from(index) >= frames {
        return Err(err(format!(
            "frame {index} does not exist (the file has {frames} frame{})",
            if frames == 1 { "" } else { "s" }
        )));
    }
    let photometric = match (photometric_name.as_str(), samples) {
        ("MONOCHROME1", 1) => Photometric::Monochrome1,
        ("MONOCHROME2", 1) => Photometric::Monochrome2,
        ("RGB", 3) => Photometric::Rgb,
        // The JPEG decoders return RGB for YBR_FULL(_422) / YBR_ICT / YBR_RCT; native YBR is not converted.
        (p, 3) if p.starts_with("YBR") && !attr::is_native(obj) => Photometric::Rgb,
        (p, s) => {
            return Err(err(format!(
                "photometric interpretation `{p}` with {s} samples per pixel is not supported yet"
            )));
        }
    };
    let bytes = rows as u64 * cols as u64 * samples as u64 * (bits_allocated as u64 / 8);
    if bytes > max_bytes {
        return Err(err(format!(
            "a decoded frame would take {bytes} bytes, more than the limit of {max_bytes}"
        )));
    }

    // Codecs in dicom-rs 0.10 can panic on corrupt data: contain it.
    let decoded = catch_unwind(AssertUnwindSafe(|| obj.decode_pixel_data_frame(index)))
        .map_err(|_| err("the pixel data decoder crashed on this file (corrupt data?)".into()))?
        .map_err(|e| err(format!("cannot decode pixel data: {e}")))?;
    let data = decoded
        .frame_data(0)
        .map_err(|e| err(format!("cannot decode pixel data: {e}")))?;
    let n = (rows * cols * samples) as usize;
    let mut raw = samples_to_i64(data, bits_allocated as u16, bits_stored as u16, signed);
    if raw.len() < n {
        return Err(err(format!(
            "pixel data holds {} samples, {n} expected",
            raw.len()
        )));
    }
    raw.truncate(n);
    if samples == 3 && attr::int(obj, tags::PLANAR_CONFIGURATION) == Some(1) && attr::is_native(obj)
    {
        raw = interleave(&raw);
    }

    let (slope, intercept) = if photometric == Photometric::Rgb {
        (1.0, 0.0)
    } else {
        (
            attr::float(obj, tags::RESCALE_SLOPE).unwrap_or(1.0),
            attr::float(obj, tags::RESCALE_INTERCEPT).unwrap_or(0.0),
        )
    };
    let values = raw
        .iter()
        .map(|&v| (v as f64 * slope + intercept) as f32)
        .collect();
    let file_window = match (
        attr::float(obj, tags::WINDOW_CENTER),
        attr::float(obj, tags::WINDOW_WIDTH),
    ) {
        (Some(c), Some(w)) => Some((c, w)),
        _ => None,
    };
    Ok(Frame {
        width: cols as u32,
        height: rows as u32,
        photometric,
        bits_stored: bits_stored as u16,
        values,
        file_window,
    })
}

/// Native-endian samples → stored values: masked to `bits_stored`, sign-extended when signed.
fn samples_to_i64(data: &[u8], bits_allocated: u16, bits_stored: u16, signed: bool) -> Vec<i64> {
    let mask: u64 = if bits_stored >= 64 {
        u64::MAX
    } else {
        (1u64 << bits_stored) - 1
    };
    let convert = |v: u64| -> i64 {
        let v = v & mask;
        if signed && bits_stored < 64 && v >> (bits_stored - 1) & 1 == 1 {
            (v | !mask) as i64
        } else {
            v as i64
        }
    };
    match bits_allocated {
        8 => data.iter().map(|&b| convert(u64::from(b))).collect(),
        16 => data
            .chunks_exact(2)
            .map(|c| convert(u64::from(u16::from_ne_bytes([c[0], c[1]]))))
            .collect(),
        _ => data
            .chunks_exact(4)
            .map(|c| convert(u64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))))
            .collect(),
    }
}

/// Planar RGB (RRR…GGG…BBB…) → interleaved (RGBRGB…).
fn interleave(planar: &[i64]) -> Vec<i64> {
    let n = planar.len() / 3;
    (0..n)
        .flat_map(|i| [planar[i], planar[n + i], planar[2 * n + i]])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_extends_from_bits_stored() {
        let data: Vec<u8> = [0x0FFFu16, 0x0800, 0x07FF, 0xF001]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        assert_eq!(samples_to_i64(&data, 16, 12, true), [-1, -2048, 2047, 1]);
        assert_eq!(samples_to_i64(&data, 16, 12, false), [4095, 2048, 2047, 1]);
        assert_eq!(
            samples_to_i64(&data, 16, 16, true),
            [4095, 2048, 2047, -4095]
        );
    }

    #[test]
    fn interleaves_planar_rgb() {
        assert_eq!(interleave(&[1, 2, 3, 4, 5, 6]), [1, 3, 5, 2, 4, 6]);
    }
}
