//! DICOM files: safe opening, decoding one frame to modality values, VOI windowing and rendering to the
//! 8-bit image a clinician sees, plus a metadata summary.
//!
//! Invariants: a declared length is checked against the file size before dicom-rs sees the file
//! ([`scan`]); decoding runs behind `catch_unwind` and a decoded frame larger than
//! [`DicomOptions::max_frame_bytes`] is refused before it is allocated; every error names the file.
//! dicom-rs is used for parsing and codecs only: rescale / Modality LUT, window / VOI LUT, MONOCHROME1
//! inversion and the PALETTE COLOR lookup are done here.

mod attr;
pub mod deid;
use super::guard;
pub mod meta;
pub mod pixels;
pub mod render;
pub mod scan;
pub mod series;
pub mod window;

use std::path::{Path, PathBuf};

use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use image::DynamicImage;

pub use meta::{PatientIdentity, Summary};
pub use pixels::{DEFAULT_MAX_FRAME_BYTES, Frame, Lut, Photometric};
pub use window::{PRESETS, Window, WindowChoice};

use crate::error::{Error, Result};

/// Limits for opening untrusted files.
#[derive(Debug, Clone, Copy)]
pub struct DicomOptions {
    /// Largest decoded frame accepted, in bytes (default 1 GiB), counting at least 4 bytes a sample (the
    /// modality values are `f32`).
    pub max_frame_bytes: u64,
}

impl Default for DicomOptions {
    fn default() -> Self {
        Self {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// An opened DICOM file.
pub struct DicomFile {
    path: PathBuf,
    object: DefaultDicomObject,
    options: DicomOptions,
}

/// A rendered frame and how it was rendered.
pub struct Rendered {
    /// 8-bit grey (or RGB for colour files).
    pub image: DynamicImage,
    /// The window used (grey images), unless `voi_lut` is set.
    pub window: Window,
    /// Whether the file's VOI LUT was applied instead of a window (the default choice on a file that has
    /// one).
    pub voi_lut: bool,
    /// The decoded frame: modality values for HU readout.
    pub frame: Frame,
}

/// Whether `bytes` start like a DICOM file (`DICM` after the 128-byte preamble).
pub fn has_dicom_magic(bytes: &[u8]) -> bool {
    bytes.get(128..132) == Some(b"DICM")
}

impl DicomFile {
    /// Opens `path` after checking its structure.
    pub fn open(path: &Path, options: DicomOptions) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, path, options)
    }

    /// Opens a file already in memory; `origin` names it in errors (a path, or any label).
    pub fn from_bytes(bytes: &[u8], origin: &Path, options: DicomOptions) -> Result<Self> {
        let path = origin;
        // A deflated data set may hold every frame: allow it the frame cap plus room for the rest.
        let max_inflated = options.max_frame_bytes.saturating_add(256 << 20);
        let layout = scan::check(bytes, max_inflated).map_err(|m| Error::image(path, m))?;
        // Parse the checked bytes (not the file again), from the `DICM` marker to the end of the data set.
        let checked = &bytes[layout.magic..layout.end];
        let object = guard::contain(|| {
            OpenFileOptions::new()
                .read_preamble(ReadPreamble::Never)
                .from_reader(checked)
        })
        .map_err(|m| Error::image(path, format!("the DICOM parser crashed on this file ({m})")))?
        .map_err(|e| Error::image(path, format!("cannot read DICOM: {}", chain(&e))))?;
        Ok(Self {
            path: path.to_path_buf(),
            object,
            options,
        })
    }

    /// The dicom-rs object.
    pub fn object(&self) -> &DefaultDicomObject {
        &self.object
    }

    /// What the image is (no patient identity).
    pub fn summary(&self) -> Summary {
        meta::summary(&self.object)
    }

    /// Who the image is of.
    pub fn patient_identity(&self) -> PatientIdentity {
        meta::patient_identity(&self.object)
    }

    /// Decodes frame `index` (0-based) to modality values.
    pub fn frame(&self, index: usize) -> Result<Frame> {
        let index = u32::try_from(index)
            .map_err(|_| Error::image(&self.path, format!("frame {index} does not exist")))?;
        pixels::decode_frame(
            &self.path,
            &self.object,
            index,
            self.options.max_frame_bytes,
        )
    }

    /// Decodes and renders frame `index` with `window`.
    pub fn render(&self, index: usize, window: WindowChoice) -> Result<Rendered> {
        let frame = self.frame(index)?;
        let lut = match window {
            WindowChoice::Default if frame.photometric != Photometric::Rgb => {
                frame.voi_lut.as_ref()
            }
            _ => None,
        };
        let resolved = window.resolve(frame.file_window, &frame.values);
        let image = match lut {
            Some(lut) => render::render_voi_lut(&frame, lut),
            None => render::render(&frame, resolved),
        };
        Ok(Rendered {
            image,
            window: resolved,
            voi_lut: lut.is_some(),
            frame,
        })
    }
}

/// An error with its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let m = src.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = src.source();
    }
    s
}
