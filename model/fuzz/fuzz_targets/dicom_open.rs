//! Open and render arbitrary bytes as a DICOM file, as the application does: any panic that escapes, abort,
//! timeout (`-timeout`) or out-of-memory (`-rss_limit_mb`, `-malloc_limit_mb`) is a finding. Seed the corpus
//! with valid files, e.g. `cp ~/.cache/llava-med-test-data/dicom/*/*.dcm fuzz/corpus/dicom_open/`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use llava_med::imaging::dicom::{DicomFile, DicomOptions, WindowChoice};

fuzz_target!(|bytes: &[u8]| {
    let options = DicomOptions {
        max_frame_bytes: 64 << 20,
    };
    if let Ok(file) = DicomFile::from_bytes(bytes, Path::new("fuzz.dcm"), options) {
        let _ = (file.summary(), file.patient_identity());
        for frame in 0..3 {
            if file.render(frame, WindowChoice::Default).is_err() {
                break;
            }
        }
    }
});
