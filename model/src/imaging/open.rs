//! One entry point for every image file the app accepts: PNG/JPEG/TIFF through `image`, DICOM through
//! [`super::dicom`]; a 16-bit grey image is windowed like DICOM (the automatic window unless one is given).

use std::io::Read;
use std::path::Path;

use image::{DynamicImage, GrayImage};

use super::dicom::{DicomFile, DicomOptions, WindowChoice};
use super::preprocess::{load_image, load_image_bytes};
use crate::error::{Error, Result};

/// Whether `path` is a DICOM file: the `DICM` marker, or a `.dcm` extension.
pub fn is_dicom(path: &Path) -> bool {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("dcm") || e.eq_ignore_ascii_case("dicom"));
    let mut head = [0u8; 132];
    let magic = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && super::dicom::has_dicom_magic(&head);
    ext || magic
}

/// Opens any supported image as the 8-bit image to show (and give the model). For DICOM, `frame`
/// (0-based, default 0) and `window` (default: the file's) choose what is rendered; for other files a
/// frame other than 0 is an error and a window applies only to 16-bit grey images (which get the automatic
/// window when none is given).
pub fn open_any(
    path: &Path,
    frame: Option<usize>,
    window: Option<WindowChoice>,
) -> Result<DynamicImage> {
    open_any_with(path, frame, window, DicomOptions::default())
}

/// [`open_any`] with explicit limits for DICOM files.
pub fn open_any_with(
    path: &Path,
    frame: Option<usize>,
    window: Option<WindowChoice>,
    options: DicomOptions,
) -> Result<DynamicImage> {
    if is_dicom(path) {
        let file = DicomFile::open(path, options)?;
        let rendered = file.render(frame.unwrap_or(0), window.unwrap_or(WindowChoice::Default))?;
        return Ok(rendered.image);
    }
    check_single_frame(path, frame)?;
    Ok(window_16_bit(load_image(path)?, window))
}

/// [`open_any_with`] for a file already in memory (an upload); `origin` names it in errors. DICOM is
/// recognised by its `DICM` marker (or `dicom = true`, for a data set sent without the preamble).
pub fn open_any_bytes(
    bytes: &[u8],
    origin: &Path,
    dicom: bool,
    frame: Option<usize>,
    window: Option<WindowChoice>,
    options: DicomOptions,
) -> Result<DynamicImage> {
    if dicom || super::dicom::has_dicom_magic(bytes) {
        let file = DicomFile::from_bytes(bytes, origin, options)?;
        let rendered = file.render(frame.unwrap_or(0), window.unwrap_or(WindowChoice::Default))?;
        return Ok(rendered.image);
    }
    check_single_frame(origin, frame)?;
    Ok(window_16_bit(load_image_bytes(bytes, origin)?, window))
}

fn check_single_frame(origin: &Path, frame: Option<usize>) -> Result<()> {
    if frame.is_some_and(|f| f != 0) {
        return Err(Error::image(
            origin,
            "a frame other than 0 applies to DICOM files only (this image has one frame)",
        ));
    }
    Ok(())
}

/// 16-bit grey (often raw CT/MR values exported as PNG/TIFF) is windowed like DICOM: a linear 16→8-bit
/// scaling would show 12-bit data as nearly black. Without a window: `Default`, which for a file without
/// one is the robust automatic window. Other images pass unchanged.
fn window_16_bit(image: DynamicImage, window: Option<WindowChoice>) -> DynamicImage {
    match &image {
        DynamicImage::ImageLuma16(grey) => {
            let values: Vec<f32> = grey.as_raw().iter().map(|&v| f32::from(v)).collect();
            let w = window
                .unwrap_or(WindowChoice::Default)
                .resolve(None, &values);
            let px = values.iter().map(|&v| w.apply(v)).collect();
            let out = GrayImage::from_raw(grey.width(), grey.height(), px)
                .expect("same size as the input");
            DynamicImage::ImageLuma8(out)
        }
        _ => image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imaging::dicom::Window;

    #[test]
    fn windows_a_16_bit_grey_png() {
        let path =
            std::env::temp_dir().join(format!("llava-med-grey16-{}.png", std::process::id()));
        let img =
            image::ImageBuffer::<image::Luma<u16>, _>::from_raw(3, 1, vec![0u16, 1000, 60000])
                .unwrap();
        img.save(&path).unwrap();
        let window = WindowChoice::Fixed(Window::new(1000.5, 1001.0));
        let out = open_any(&path, None, Some(window));
        let auto = open_any(&path, None, None);
        let _ = std::fs::remove_file(&path);
        assert_eq!(out.unwrap().to_luma8().into_raw(), [0, 128, 255]);
        // No window: the automatic one, so 12-bit-range data is not rendered nearly black.
        let auto = auto.unwrap();
        assert!(matches!(auto, DynamicImage::ImageLuma8(_)));
        assert_eq!(auto.to_luma8().into_raw()[0], 0);
        assert!(open_any(Path::new("x.png"), Some(1), None).is_err());
    }
}
