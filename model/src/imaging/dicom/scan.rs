//! A structural pre-scan of a DICOM file before dicom-rs parses it.
//!
//! dicom-rs 0.10 trusts declared element lengths: a 674-byte file (pydicom's `UN_sequence.dcm`) makes it
//! allocate 3.6 GB before failing. This walks the data set the way a lenient parser reads it (explicit VR,
//! with unknown VRs taking 4-byte lengths, as dicom-rs does inside a `UN` of undefined length), descending
//! into sequences, items and encapsulated pixel data, and rejects any declared length that runs past the end
//! of its container. It allocates nothing (except to inflate a deflated data set, up to a limit) and reads
//! each byte at most once.

use std::cell::Cell;
use std::io::Read;

/// Deepest sequence nesting accepted.
const MAX_DEPTH: usize = 64;
/// Undefined length.
const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);
const PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0010);

/// How the data set after the file meta group is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// Explicit VR (else implicit).
    pub explicit: bool,
    /// Little endian (else big).
    pub little: bool,
    /// Deflated (the data set cannot be scanned without inflating it).
    pub deflated: bool,
}

impl Encoding {
    /// The encoding of a transfer syntax UID; unknown (compressed) ones are explicit VR little endian.
    pub fn of_transfer_syntax(uid: &str) -> Self {
        let uid = uid.trim_end_matches(['\0', ' ']);
        let (explicit, little, deflated) = match uid {
            "1.2.840.10008.1.2" => (false, true, false),
            "1.2.840.10008.1.2.2" => (true, false, false),
            "1.2.840.10008.1.2.1.99" => (true, true, true),
            _ => (true, true, false),
        };
        Self {
            explicit,
            little,
            deflated,
        }
    }
}

/// Where the parts of a checked file are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Offset of the `DICM` marker (128 after a preamble, else 0).
    pub magic: usize,
    /// End of the data set: trailing zero padding excluded (dicom-rs fails on it).
    pub end: usize,
    /// Whether the top-level data set holds pixel data (Pixel Data, Float or Double Float Pixel Data).
    pub pixel_data: bool,
}

/// Checks the file's structure; `Err` says what is wrong and where. A deflated data set is inflated to at
/// most `max_inflated` bytes for the check.
pub fn check(bytes: &[u8], max_inflated: u64) -> Result<Layout, String> {
    let start = if bytes.get(128..132) == Some(b"DICM") {
        132
    } else if bytes.get(0..4) == Some(b"DICM") {
        4
    } else {
        return Err("not a DICOM file (no `DICM` marker after a 128-byte preamble)".into());
    };
    let mut s = Scanner {
        bytes,
        pixel_data: Cell::new(false),
        enc: Encoding {
            explicit: true,
            little: true,
            deflated: false,
        },
    };
    let (pos, uid) = s.meta_group(start)?;
    let enc = Encoding::of_transfer_syntax(uid.as_deref().unwrap_or("1.2.840.10008.1.2.1"));
    let magic = start - 4;
    s.enc = enc;
    if enc.deflated {
        let mut inflated = Vec::new();
        flate2::read::DeflateDecoder::new(&bytes[pos..])
            .take(max_inflated.saturating_add(1))
            .read_to_end(&mut inflated)
            .map_err(|e| format!("cannot inflate the deflated data set: {e}"))?;
        if inflated.len() as u64 > max_inflated {
            return Err(format!(
                "the deflated data set inflates to more than {max_inflated} bytes"
            ));
        }
        let inner = Scanner {
            bytes: &inflated,
            pixel_data: Cell::new(false),
            enc: s.enc,
        };
        inner.elements(0, inflated.len(), 0, false)?;
        let end = bytes.len();
        let pixel_data = inner.pixel_data.get();
        return Ok(Layout {
            magic,
            end,
            pixel_data,
        });
    }
    let end = s.elements(pos, bytes.len(), 0, false)?;
    Ok(Layout {
        magic,
        end,
        pixel_data: s.pixel_data.get(),
    })
}

struct Scanner<'a> {
    bytes: &'a [u8],
    /// Set when a top-level pixel data element is met.
    pixel_data: Cell<bool>,
    enc: Encoding,
}

impl Scanner<'_> {
    fn u16_at(&self, pos: usize, little: bool) -> Option<u16> {
        let b: [u8; 2] = self.bytes.get(pos..pos + 2)?.try_into().ok()?;
        Some(if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    }

    fn u32_at(&self, pos: usize, little: bool) -> Option<u32> {
        let b: [u8; 4] = self.bytes.get(pos..pos + 4)?.try_into().ok()?;
        Some(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    }

    /// The file meta group (always explicit VR little endian); returns the position after it and the
    /// transfer syntax UID.
    fn meta_group(&self, mut pos: usize) -> Result<(usize, Option<String>), String> {
        let mut uid = None;
        while self.u16_at(pos, true) == Some(0x0002) {
            let elem = self
                .u16_at(pos + 2, true)
                .ok_or("truncated file meta group")?;
            let (value, len) = self.header(pos, true, true)?;
            let len = len as usize;
            if len == UNDEFINED as usize || len > self.bytes.len() - value {
                return Err(format!(
                    "file meta element (0002,{elem:04X}) at offset {pos} declares {len} bytes, more than the file holds"
                ));
            }
            if elem == 0x0010 {
                uid = Some(String::from_utf8_lossy(&self.bytes[value..value + len]).into_owned());
            }
            pos = value + len;
        }
        Ok((pos, uid))
    }

    /// Reads an element header at `pos`: (start of the value, declared length).
    fn header(&self, pos: usize, explicit: bool, little: bool) -> Result<(usize, u32), String> {
        let truncated = || format!("truncated element header at offset {pos}");
        let group = self.u16_at(pos, little).ok_or_else(truncated)?;
        if explicit && group != 0xFFFE {
            let vr = self.bytes.get(pos + 4..pos + 6).ok_or_else(truncated)?;
            let short = matches!(
                vr,
                b"AE"
                    | b"AS"
                    | b"AT"
                    | b"CS"
                    | b"DA"
                    | b"DS"
                    | b"DT"
                    | b"FL"
                    | b"FD"
                    | b"IS"
                    | b"LO"
                    | b"LT"
                    | b"PN"
                    | b"SH"
                    | b"SL"
                    | b"SS"
                    | b"ST"
                    | b"TM"
                    | b"UI"
                    | b"UL"
                    | b"US"
            );
            if short {
                let len = self.u16_at(pos + 6, little).ok_or_else(truncated)?;
                return Ok((pos + 8, u32::from(len)));
            }
            let len = self.u32_at(pos + 8, little).ok_or_else(truncated)?;
            return Ok((pos + 12, len));
        }
        let len = self.u32_at(pos + 4, little).ok_or_else(truncated)?;
        Ok((pos + 8, len))
    }

    fn tag(&self, pos: usize) -> Option<(u16, u16)> {
        Some((
            self.u16_at(pos, self.enc.little)?,
            self.u16_at(pos + 2, self.enc.little)?,
        ))
    }

    /// Elements from `pos` up to `end`; with `until_delimiter`, stops after an item delimiter.
    /// Returns the position after the last one read.
    fn elements(
        &self,
        mut pos: usize,
        end: usize,
        depth: usize,
        until_delimiter: bool,
    ) -> Result<usize, String> {
        if depth > MAX_DEPTH {
            return Err(format!("sequences nested deeper than {MAX_DEPTH} levels"));
        }
        while pos < end {
            if depth == 0 && self.bytes[pos..end].iter().all(|&b| b == 0) {
                // Zero padding after the data set (seen in real files): nothing to read.
                return Ok(pos);
            }
            let tag = self
                .tag(pos)
                .ok_or_else(|| format!("truncated element at offset {pos}"))?;
            let (value, len) = self.header(pos, self.enc.explicit, self.enc.little)?;
            if value > end {
                return Err(format!("truncated element header at offset {pos}"));
            }
            if depth == 0 && tag.0 == 0x7FE0 && matches!(tag.1, 0x0008 | 0x0009 | 0x0010) {
                self.pixel_data.set(true);
            }
            if tag == ITEM_END || tag == SEQUENCE_END {
                if until_delimiter {
                    return Ok(value);
                }
                pos = value;
                continue;
            }
            pos = if len == UNDEFINED {
                self.undefined_length(tag, value, end, depth)?
            } else {
                let len = len as usize;
                if len > end - value {
                    return Err(format!(
                        "element ({:04X},{:04X}) at offset {pos} declares {len} bytes, but only {} remain",
                        tag.0,
                        tag.1,
                        end - value
                    ));
                }
                if self.tag(value) == Some(ITEM) && len >= 8 {
                    self.items(value, value + len, depth + 1)?;
                }
                value + len
            };
        }
        if until_delimiter {
            return Err("item without its delimiter before the end of its container".into());
        }
        Ok(pos)
    }

    /// The value of an undefined-length element at `value`: a sequence of items (or pixel data fragments)
    /// closed by a sequence delimiter. Returns the position after the delimiter.
    fn undefined_length(
        &self,
        tag: (u16, u16),
        mut pos: usize,
        end: usize,
        depth: usize,
    ) -> Result<usize, String> {
        let fragments = tag == PIXEL_DATA;
        loop {
            let item = self.tag(pos).ok_or_else(|| {
                format!(
                    "element ({:04X},{:04X}) of undefined length runs past the end of the file",
                    tag.0, tag.1
                )
            })?;
            let len = self
                .u32_at(pos + 4, self.enc.little)
                .ok_or_else(|| format!("truncated item header at offset {pos}"))?;
            let value = pos + 8;
            if item == SEQUENCE_END {
                return Ok(value);
            }
            if item != ITEM {
                return Err(format!(
                    "expected an item in ({:04X},{:04X}) at offset {pos}, found ({:04X},{:04X})",
                    tag.0, tag.1, item.0, item.1
                ));
            }
            if len == UNDEFINED && !fragments {
                pos = self.elements(value, end, depth + 1, true)?;
                continue;
            }
            let len = len as usize;
            if len > end.saturating_sub(value) {
                return Err(format!(
                    "item at offset {pos} in ({:04X},{:04X}) declares {len} bytes, but only {} remain",
                    tag.0,
                    tag.1,
                    end.saturating_sub(value)
                ));
            }
            if !fragments {
                self.elements(value, value + len, depth + 1, false)?;
            }
            pos = value + len;
        }
    }

    /// Defined-length items between `pos` and `end` (the value of a defined-length sequence).
    fn items(&self, mut pos: usize, end: usize, depth: usize) -> Result<(), String> {
        while pos + 8 <= end {
            let item = self.tag(pos).unwrap_or((0, 0));
            if item != ITEM {
                // Not a sequence after all (binary data that starts like an item): leave it alone.
                return Ok(());
            }
            let len = self.u32_at(pos + 4, self.enc.little).unwrap_or(0);
            let value = pos + 8;
            if len == UNDEFINED {
                pos = self.elements(value, end, depth + 1, true)?;
                continue;
            }
            let len = len as usize;
            if len > end - value {
                return Err(format!(
                    "item at offset {pos} declares {len} bytes, but only {} remain in its sequence",
                    end - value
                ));
            }
            self.elements(value, value + len, depth + 1, false)?;
            pos = value + len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dataset: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 128];
        f.extend_from_slice(b"DICM");
        let uid = b"1.2.840.10008.1.2.1\0";
        f.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I', uid.len() as u8, 0]);
        f.extend_from_slice(uid);
        f.extend_from_slice(dataset);
        f
    }

    #[test]
    fn accepts_a_well_formed_data_set() {
        let ds = [
            0x08, 0x00, 0x60, 0x00, b'C', b'S', 2, 0, b'C', b'T', // Modality CT
            0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 4, 0, 0, 0, 1, 2, 3, 4,
        ];
        assert!(check(&file(&ds), 1 << 20).is_ok());
    }

    #[test]
    fn rejects_a_length_past_the_end() {
        let ds = [
            0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 0, 0, 0, 0x40, 1, 2,
        ];
        let err = check(&file(&ds), 1 << 20).unwrap_err();
        assert!(err.contains("(7FE0,0010)"), "{err}");
    }

    #[test]
    fn rejects_a_sequence_without_its_end() {
        let ds = [
            0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE, 0xFF, 0x00,
            0xE0,
        ];
        assert!(check(&file(&ds), 1 << 20).is_err());
    }

    #[test]
    fn ignores_zero_padding_after_the_data_set() {
        let ds = [
            0x08, 0x00, 0x60, 0x00, b'C', b'S', 2, 0, b'C', b'T', 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let f = file(&ds);
        assert_eq!(
            check(&f, 1 << 20),
            Ok(Layout {
                magic: 128,
                end: f.len() - 8,
                pixel_data: false,
            })
        );
    }

    #[test]
    fn checks_inside_a_deflated_data_set() {
        use std::io::Write;
        let deflated = |ds: &[u8]| {
            let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
            z.write_all(ds).unwrap();
            z.finish().unwrap()
        };
        let file = |ds: &[u8]| {
            let mut f = vec![0u8; 128];
            f.extend_from_slice(b"DICM");
            let uid = b"1.2.840.10008.1.2.1.99";
            f.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I', uid.len() as u8, 0]);
            f.extend_from_slice(uid);
            f.extend_from_slice(&deflated(ds));
            f
        };
        let good = [0x08, 0x00, 0x60, 0x00, b'C', b'S', 2, 0, b'C', b'T'];
        assert!(check(&file(&good), 1 << 20).is_ok());
        let bad = [
            0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 0, 0, 0, 0x40, 1, 2,
        ];
        assert!(check(&file(&bad), 1 << 20).is_err());
        assert!(
            check(&file(&[0u8; 4096]), 1000)
                .unwrap_err()
                .contains("inflates")
        );
    }

    #[test]
    fn rejects_files_without_the_marker() {
        assert!(check(b"hello", 1 << 20).is_err());
        assert!(check(&[], 1 << 20).is_err());
    }
}
