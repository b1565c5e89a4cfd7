//! Decoding one frame into modality values (after rescale slope/intercept), with dicom-rs doing only the
//! codec work: its own normalisation is not used (it gets signed images with negative values wrong).

use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::DefaultDicomObject;
use dicom_pixeldata::PixelDecoder;

use super::{attr, guard};
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
    // The cap covers the decoded samples and the modality values (4 bytes a sample) made from them.
    let n = rows as u64 * cols as u64 * samples as u64;
    let bytes = n * (bits_allocated as u64 / 8).max(4);
    if bytes > max_bytes {
        return Err(err(format!(
            "a decoded frame would take {bytes} bytes, more than the limit of {max_bytes}"
        )));
    }

    check_jpeg2000_size(obj, rows as u64 * cols as u64, samples as u64).map_err(err)?;

    // Codecs in dicom-rs 0.10 can panic on corrupt data: contain it.
    let decoded = guard::contain(|| obj.decode_pixel_data_frame(index))
        .map_err(|m| err(format!("the pixel data decoder crashed on this file ({m})")))?
        .map_err(|e| err(format!("cannot decode pixel data: {e}")))?;
    let data = decoded
        .frame_data(0)
        .map_err(|e| err(format!("cannot decode pixel data: {e}")))?;
    let n = n as usize;
    let stored = Stored::new(data, bits_allocated as u16, bits_stored as u16, signed);
    if stored.len() < n {
        return Err(err(format!(
            "pixel data holds {} samples, {n} expected",
            stored.len()
        )));
    }
    let planar = samples == 3
        && attr::int(obj, tags::PLANAR_CONFIGURATION) == Some(1)
        && attr::is_native(obj);

    let (slope, intercept) = if photometric == Photometric::Rgb {
        (1.0, 0.0)
    } else {
        (
            attr::float(obj, tags::RESCALE_SLOPE).unwrap_or(1.0),
            attr::float(obj, tags::RESCALE_INTERCEPT).unwrap_or(0.0),
        )
    };
    let pixels = n / 3;
    let values = (0..n)
        .map(|i| {
            // Planar RGB (RRR…GGG…BBB…) is read interleaved (RGBRGB…).
            let source = if planar { (i % 3) * pixels + i / 3 } else { i };
            (stored.get(source) as f64 * slope + intercept) as f32
        })
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

/// JPEG 2000 codestreams declare their own image size, which the decoder trusts: a corrupted `SIZ` marker
/// makes it decode billions of pixels (a mutated 14 kB file took 34 s). Refuses a codestream (in any fragment
/// of the pixel data) whose image is larger than the frame (`pixels` × `samples`) the file declares.
fn check_jpeg2000_size(obj: &DefaultDicomObject, pixels: u64, samples: u64) -> Result<(), String> {
    let Some(fragments) = obj
        .element_opt(tags::PIXEL_DATA)
        .ok()
        .flatten()
        .and_then(|e| e.value().fragments())
    else {
        return Ok(());
    };
    for fragment in fragments {
        if let Some((width, height, components)) = jpeg2000_size(fragment)
            && (width * height > pixels || components > samples)
        {
            return Err(format!(
                "the JPEG 2000 image is {width}×{height} with {components} components, larger than the \
                 frame the file declares"
            ));
        }
    }
    Ok(())
}

/// The image size and component count of a JPEG 2000 codestream starting in the first 4 kB of `data` (raw,
/// or after JP2 boxes): the `SIZ` marker segment right after `SOC`.
fn jpeg2000_size(data: &[u8]) -> Option<(u64, u64, u64)> {
    let head = &data[..data.len().min(4096)];
    let at = head
        .windows(4)
        .position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])?;
    let siz = data.get(at + 4..at + 4 + 38)?;
    let u32_at = |i: usize| {
        u64::from(u32::from_be_bytes([
            siz[i],
            siz[i + 1],
            siz[i + 2],
            siz[i + 3],
        ]))
    };
    let (x, y, x0, y0) = (u32_at(4), u32_at(8), u32_at(12), u32_at(16));
    let components = u64::from(u16::from_be_bytes([siz[36], siz[37]]));
    Some((x.saturating_sub(x0), y.saturating_sub(y0), components))
}

/// Native-endian samples read as stored values: masked to `bits_stored`, sign-extended when signed.
struct Stored<'a> {
    data: &'a [u8],
    bytes: usize,
    mask: u64,
    sign_bit: Option<u64>,
}

impl<'a> Stored<'a> {
    fn new(data: &'a [u8], bits_allocated: u16, bits_stored: u16, signed: bool) -> Self {
        let mask = if bits_stored >= 64 {
            u64::MAX
        } else {
            (1u64 << bits_stored) - 1
        };
        Self {
            data,
            bytes: usize::from(bits_allocated / 8).max(1),
            mask,
            sign_bit: (signed && (1..64).contains(&bits_stored)).then(|| 1u64 << (bits_stored - 1)),
        }
    }

    /// Number of whole samples.
    fn len(&self) -> usize {
        self.data.len() / self.bytes
    }

    /// Sample `i` (< `len()`).
    fn get(&self, i: usize) -> i64 {
        let b = &self.data[i * self.bytes..(i + 1) * self.bytes];
        let v = match *b {
            [x] => u64::from(x),
            [x, y] => u64::from(u16::from_ne_bytes([x, y])),
            [x, y, z, w] => u64::from(u32::from_ne_bytes([x, y, z, w])),
            _ => 0,
        } & self.mask;
        match self.sign_bit {
            Some(bit) if v & bit != 0 => (v | !self.mask) as i64,
            _ => v as i64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_jpeg2000_image_size() {
        let mut siz = vec![0x00, 0x00, 0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x29, 0x00, 0x00];
        for v in [512u32, 300, 0, 44, 512, 512, 0, 0] {
            siz.extend(v.to_be_bytes());
        }
        siz.extend(3u16.to_be_bytes());
        assert_eq!(jpeg2000_size(&siz), Some((512, 256, 3)));
        assert_eq!(jpeg2000_size(&siz[..20]), None);
        assert_eq!(jpeg2000_size(&[0xFF, 0xD8, 0xFF, 0xE0]), None);
    }

    #[test]
    fn sign_extends_from_bits_stored() {
        let data: Vec<u8> = [0x0FFFu16, 0x0800, 0x07FF, 0xF001]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let all = |bits, signed| {
            let s = Stored::new(&data, 16, bits, signed);
            (0..s.len()).map(|i| s.get(i)).collect::<Vec<_>>()
        };
        assert_eq!(all(12, true), [-1, -2048, 2047, 1]);
        assert_eq!(all(12, false), [4095, 2048, 2047, 1]);
        assert_eq!(all(16, true), [4095, 2048, 2047, -4095]);
    }
}
