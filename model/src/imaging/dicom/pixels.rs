//! Decoding one frame into modality values (after rescale slope/intercept), with dicom-rs doing only the
//! codec work: its own normalisation is not used (it gets signed images with negative values wrong).

use std::ops::Add;
use std::path::Path;

use dicom_core::{PrimitiveValue, Tag};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject};
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
    /// Three samples per pixel, already RGB after decoding (PALETTE COLOR frames are looked up to 8-bit
    /// RGB, native YBR_FULL(_422) frames converted to 8-bit RGB, when decoded).
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
    /// The file's first VOI LUT (VOI LUT Sequence), if any: used instead of `file_window` by the default
    /// window choice.
    pub voi_lut: Option<Lut>,
}

/// A lookup table of the Modality LUT, VOI LUT or Palette Color LUT modules (PS3.3 C.11.1.1, C.11.2.1.1,
/// C.7.6.3.1.5): input values below `first` map to the first entry, values past the end to the last.
#[derive(Debug, Clone, PartialEq)]
pub struct Lut {
    /// The first input value mapped (descriptor value 2).
    pub first: i64,
    /// Bits per entry (descriptor value 3): the output range is 0 ..= 2^bits − 1.
    pub bits: u16,
    /// The entries.
    pub entries: Vec<u16>,
}

impl Lut {
    /// The entry for input value `x`.
    pub fn get(&self, x: i64) -> u16 {
        let last = self.entries.len() as i64 - 1;
        self.entries[(x - self.first).clamp(0, last) as usize]
    }

    /// The largest output value, 2^bits − 1.
    pub fn max_output(&self) -> f64 {
        ((1u64 << self.bits.clamp(1, 32)) - 1) as f64
    }

    /// Reads a LUT from its descriptor and data attributes in `item`; `None` when the descriptor is absent.
    /// `signed` tells whether the input values are signed (a first mapped value stored as US ≥ 2^15 is then
    /// negative).
    fn read(
        item: &InMemDicomObject,
        descriptor: Tag,
        data: Tag,
        signed: bool,
    ) -> Result<Option<Self>, String> {
        let Some(desc) = item.element_opt(descriptor).ok().flatten() else {
            return Ok(None);
        };
        let desc = desc
            .to_multi_int::<i64>()
            .ok()
            .filter(|d| d.len() == 3)
            .ok_or("invalid LUT descriptor (three numbers expected)")?;
        let count = if desc[0] == 0 { 65536 } else { desc[0] } as usize;
        let first = if signed && desc[1] >= 32768 {
            desc[1] - 65536
        } else {
            desc[1]
        };
        let bits = u16::try_from(desc[2])
            .ok()
            .filter(|b| (1..=16).contains(b))
            .ok_or_else(|| format!("unsupported LUT entry size of {} bits", desc[2]))?;
        let value = item
            .element_opt(data)
            .ok()
            .flatten()
            .ok_or("a LUT descriptor without LUT data")?;
        let words: Vec<u16> = match value.value().primitive() {
            Some(PrimitiveValue::U16(v)) => v.to_vec(),
            Some(PrimitiveValue::U8(b)) => b
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]))
                .collect(),
            _ => value
                .to_multi_int::<i64>()
                .map_err(|_| "invalid LUT data")?
                .into_iter()
                .map(|v| v as u16)
                .collect(),
        };
        let entries = if words.len() >= count {
            words[..count].to_vec()
        } else if bits <= 8 && words.len() * 2 >= count {
            // 8-bit entries packed two to a 16-bit word, in file (little-endian) order.
            words
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .take(count)
                .map(u16::from)
                .collect()
        } else {
            return Err(format!(
                "the LUT declares {count} entries but its data holds {}",
                words.len()
            ));
        };
        Ok(Some(Self {
            first,
            bits,
            entries,
        }))
    }
}

/// The first item of sequence `tag`, if any.
fn first_item(obj: &DefaultDicomObject, tag: Tag) -> Option<&InMemDicomObject> {
    obj.element_opt(tag).ok()??.items()?.first()
}

/// The Red, Green and Blue Palette Color LUTs of a PALETTE COLOR image.
fn palette(obj: &DefaultDicomObject, signed: bool) -> Result<[Lut; 3], String> {
    let channels = [
        (
            "Red",
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            tags::SEGMENTED_RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
        (
            "Green",
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            tags::SEGMENTED_GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
        (
            "Blue",
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            tags::SEGMENTED_BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
    ];
    let read = |(name, desc, data, segmented): (&str, Tag, Tag, Tag)| {
        let has = |t| obj.element_opt(t).ok().flatten().is_some();
        if !has(data) && has(segmented) {
            return Err("segmented palette color lookup tables are not supported yet".to_string());
        }
        Lut::read(obj, desc, data, signed)
            .map_err(|m| format!("{name} palette color LUT: {m}"))?
            .ok_or_else(|| format!("PALETTE COLOR image without a {name} palette color LUT"))
    };
    let [r, g, b] = channels;
    Ok([read(r)?, read(g)?, read(b)?])
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
        ("RGB", 3) | ("PALETTE COLOR", 1) => Photometric::Rgb,
        // The JPEG decoders return RGB for YBR_FULL(_422) / YBR_ICT / YBR_RCT.
        (p, 3) if p.starts_with("YBR") && !attr::is_native(obj) => Photometric::Rgb,
        // Native YBR_FULL / YBR_FULL_422 (8-bit) are converted to RGB here.
        ("YBR_FULL" | "YBR_FULL_422", 3) if bits_allocated == 8 => Photometric::Rgb,
        (p, s) => {
            return Err(err(format!(
                "photometric interpretation `{p}` with {s} samples per pixel is not supported yet"
            )));
        }
    };
    let palette = if photometric_name == "PALETTE COLOR" {
        Some(palette(obj, signed).map_err(err)?)
    } else {
        None
    };
    // The cap covers the decoded samples and the modality values (4 bytes a sample, three for a palette
    // image) made from them.
    let n = rows as u64 * cols as u64 * samples as u64;
    let bytes = n * (bits_allocated as u64 / 8).max(if palette.is_some() { 12 } else { 4 });
    if bytes > max_bytes {
        return Err(err(format!(
            "a decoded frame would take {bytes} bytes, more than the limit of {max_bytes}"
        )));
    }

    check_jpeg2000_size(obj, rows as u64 * cols as u64, samples as u64).map_err(err)?;

    if attr::is_native(obj) && photometric_name.starts_with("YBR") {
        // dicom-rs 0.10 neither converts native YBR nor reads YBR_FULL_422: the raw samples are used.
        let planar = attr::int(obj, tags::PLANAR_CONFIGURATION) == Some(1);
        let raw = obj
            .element(tags::PIXEL_DATA)
            .ok()
            .and_then(|e| e.to_bytes().ok())
            .ok_or_else(|| err("cannot read the pixel data".into()))?;
        let values = ybr_full_to_rgb(
            &raw,
            rows as usize,
            cols as usize,
            index as usize,
            photometric_name == "YBR_FULL_422",
            planar,
        )
        .map_err(err)?;
        return Ok(Frame {
            width: cols as u32,
            height: rows as u32,
            photometric,
            bits_stored: 8,
            values,
            file_window: None,
            voi_lut: None,
        });
    }

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

    let grey = photometric != Photometric::Rgb;
    let (slope, intercept) = if grey {
        (
            attr::float(obj, tags::RESCALE_SLOPE).unwrap_or(1.0),
            attr::float(obj, tags::RESCALE_INTERCEPT).unwrap_or(0.0),
        )
    } else {
        (1.0, 0.0)
    };
    // A Modality LUT Sequence replaces the rescale; its output is unsigned.
    let modality_lut = match first_item(obj, tags::MODALITY_LUT_SEQUENCE).filter(|_| grey) {
        Some(item) => Lut::read(item, tags::LUT_DESCRIPTOR, tags::LUT_DATA, signed)
            .map_err(|m| err(format!("Modality LUT: {m}")))?,
        None => None,
    };
    let voi_lut = match first_item(obj, tags::VOILUT_SEQUENCE).filter(|_| grey) {
        Some(item) => Lut::read(
            item,
            tags::LUT_DESCRIPTOR,
            tags::LUT_DATA,
            signed && modality_lut.is_none(),
        )
        .map_err(|m| err(format!("VOI LUT: {m}")))?,
        None => None,
    };
    let (values, bits_stored) = if let Some(luts) = &palette {
        // Each index becomes three 8-bit values, scaled from the LUT's entry size (tables made once).
        let tables = luts.each_ref().map(|lut| {
            let scale = 255.0 / lut.max_output();
            let table: Vec<f32> = lut
                .entries
                .iter()
                .map(|&e| (f64::from(e) * scale).clamp(0.0, 255.0).add(0.5).floor() as f32)
                .collect();
            (lut.first, table)
        });
        let mut values = Vec::with_capacity(n * 3);
        for i in 0..n {
            let index = stored.get(i);
            for (first, table) in &tables {
                values.push(table[(index - first).clamp(0, table.len() as i64 - 1) as usize]);
            }
        }
        (values, 8)
    } else if let Some(lut) = &modality_lut {
        let values = (0..n).map(|i| f32::from(lut.get(stored.get(i)))).collect();
        (values, bits_stored)
    } else {
        let pixels = n / 3;
        let values = (0..n)
            .map(|i| {
                // Planar RGB (RRR…GGG…BBB…) is read interleaved (RGBRGB…).
                let source = if planar { (i % 3) * pixels + i / 3 } else { i };
                (stored.get(source) as f64 * slope + intercept) as f32
            })
            .collect();
        (values, bits_stored)
    };
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
        voi_lut,
    })
}

// pydicom's coefficients, computed in f64 and then stored as f32 as numpy does.
const YBR_CR_R: f32 = 1.402;
const YBR_CB_G: f32 = (-0.114f64 * 1.772 / 0.587) as f32;
const YBR_CR_G: f32 = (-0.299f64 * 1.402 / 0.587) as f32;
const YBR_CB_B: f32 = 1.772;

/// Frame `index` of native 8-bit YBR_FULL (`subsampled` false; interleaved or, when `planar`, planar) or
/// YBR_FULL_422 (`subsampled`: Y1 Y2 Cb Cr for each pair of pixels of a row, PS3.3 C.7.6.3.1.2) pixel data,
/// converted to 8-bit RGB as pydicom's `convert_color_space(arr, "YBR_FULL", "RGB")` does: full-range
/// ITU-R BT.601 in `f32`, each value rounded half up and clipped to 0 ..= 255.
fn ybr_full_to_rgb(
    raw: &[u8],
    rows: usize,
    cols: usize,
    index: usize,
    subsampled: bool,
    planar: bool,
) -> Result<Vec<f32>, String> {
    let pixels = rows * cols;
    // YBR_FULL_422 rows hold 2 samples a pixel (an odd last pixel keeps a whole pair).
    let row_bytes = if subsampled {
        cols.div_ceil(2) * 4
    } else {
        cols * 3
    };
    let frame_bytes = row_bytes * rows;
    let start = index * frame_bytes;
    let data = raw.get(start..start + frame_bytes).ok_or_else(|| {
        format!(
            "pixel data holds {} bytes, {} expected",
            raw.len(),
            start + frame_bytes
        )
    })?;
    let mut values = Vec::with_capacity(pixels * 3);
    for r in 0..rows {
        for c in 0..cols {
            let (y, cb, cr) = if subsampled {
                let pair = &data[r * row_bytes + (c / 2) * 4..][..4];
                (pair[c % 2], pair[2], pair[3])
            } else if planar {
                let i = r * cols + c;
                (data[i], data[pixels + i], data[2 * pixels + i])
            } else {
                let i = (r * cols + c) * 3;
                (data[i], data[i + 1], data[i + 2])
            };
            let (y, cb, cr) = (f32::from(y), f32::from(cb) - 128.0, f32::from(cr) - 128.0);
            let rgb = [
                y + YBR_CR_R * cr,
                y + YBR_CB_G * cb + YBR_CR_G * cr,
                y + YBR_CB_B * cb,
            ];
            values.extend(rgb.map(|v| (v + 0.5).floor().clamp(0.0, 255.0)));
        }
    }
    Ok(values)
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
    fn converts_ybr_full_and_422_to_rgb_as_pydicom() {
        // pydicom's convert_color_space(arr, "YBR_FULL", "RGB") of these four pixels.
        let want: Vec<f32> = [254, 0, 0, 0, 0, 254, 128, 128, 128, 0, 135, 0]
            .map(|v| v as f32)
            .to_vec();
        let interleaved = [76, 85, 255, 29, 255, 107, 128, 128, 128, 0, 0, 0];
        assert_eq!(
            ybr_full_to_rgb(&interleaved, 2, 2, 0, false, false),
            Ok(want.clone())
        );
        let planar = [76, 29, 128, 0, 85, 255, 128, 0, 255, 107, 128, 0];
        assert_eq!(
            ybr_full_to_rgb(&planar, 1, 4, 0, false, true),
            Ok(want.clone())
        );
        // 4:2:2, frame 1 of 2: Y1 Y2 Cb Cr for each pair of pixels.
        let pairs = [0, 0, 0, 0, 76, 76, 85, 255, 128, 128, 128, 128];
        let got = ybr_full_to_rgb(&pairs, 1, 2, 1, true, false).unwrap();
        assert_eq!(got, want[..3].repeat(2));
        assert!(ybr_full_to_rgb(&pairs, 1, 2, 3, true, false).is_err());
    }

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

    fn lut_item(
        descriptor: [u16; 3],
        data: PrimitiveValue,
        vr: dicom_core::VR,
    ) -> InMemDicomObject {
        use dicom_core::{DataElement, VR};
        InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::LUT_DESCRIPTOR,
                VR::US,
                PrimitiveValue::U16(descriptor.to_vec().into()),
            ),
            DataElement::new(tags::LUT_DATA, vr, data),
        ])
    }

    #[test]
    fn reads_and_applies_luts() {
        use dicom_core::VR;
        let read = |item: &InMemDicomObject, signed| {
            Lut::read(item, tags::LUT_DESCRIPTOR, tags::LUT_DATA, signed)
        };
        // First mapped value 65534 stored as US: −2 for signed input.
        let item = lut_item(
            [3, 65534, 16],
            PrimitiveValue::U16(vec![10u16, 20, 30].into()),
            VR::US,
        );
        let lut = read(&item, true).unwrap().unwrap();
        assert_eq!(lut.first, -2);
        assert_eq!([-5, -2, -1, 0, 7].map(|x| lut.get(x)), [10, 10, 20, 30, 30]);
        assert_eq!(read(&item, false).unwrap().unwrap().first, 65534);
        // 8-bit entries packed two to a word.
        let item = lut_item(
            [4, 0, 8],
            PrimitiveValue::U16(vec![0x0201u16, 0x0403].into()),
            VR::OW,
        );
        let lut = read(&item, false).unwrap().unwrap();
        assert_eq!(lut.entries, [1, 2, 3, 4]);
        assert_eq!(lut.max_output(), 255.0);
        // Too little data is an error, not a panic.
        let item = lut_item(
            [300, 0, 16],
            PrimitiveValue::U16(vec![1u16, 2].into()),
            VR::US,
        );
        assert!(read(&item, false).unwrap_err().contains("300 entries"));
        assert_eq!(read(&InMemDicomObject::new_empty(), false), Ok(None));
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
