//! DICOM decode + render benchmark: for each file, decodes frame 0 to modality values and renders it to
//! 8 bits with its default window, `--runs N` times (default 20) after one warm-up, and prints one JSON line
//! per file: `{file, transfer_syntax, megapixels, decode_ms_median, render_ms_median, ms_per_megapixel}`.
//!
//! ```text
//! cargo run -p llava-med --features wgpu --example dicom_bench -- [--runs N] FILE...
//! ```
//!
//! "decode" is reading the pixel data of an already opened file through the codec to modality values
//! (rescale or Modality LUT included); "render" is resolving the window and producing the 8-bit image.
//! Opening (parsing the data set) is not counted.

use std::path::PathBuf;
use std::time::Instant;

use llava_med::imaging::dicom::{DicomFile, DicomOptions, WindowChoice, render};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let mut runs = 20usize;
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--runs" {
            runs = args
                .next()
                .and_then(|n| n.parse().ok())
                .filter(|&n| n > 0)
                .expect("--runs takes a positive number");
        } else {
            files.push(PathBuf::from(a));
        }
    }
    if files.is_empty() {
        eprintln!("usage: dicom_bench [--runs N] FILE...");
        std::process::exit(2);
    }
    for path in files {
        let file = match DicomFile::open(&path, DicomOptions::default()) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("{e}");
                continue;
            }
        };
        let ts = file.object().meta().transfer_syntax();
        let ts = ts.trim_end_matches('\0').to_string();
        let (mut decode, mut render_ms) = (Vec::new(), Vec::new());
        let mut megapixels = 0.0;
        let mut failed = false;
        // One warm-up run, then `runs` timed ones.
        for i in 0..=runs {
            let t = Instant::now();
            let frame = match file.frame(0) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("{e}");
                    failed = true;
                    break;
                }
            };
            let t_decode = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            let window = WindowChoice::Default.resolve(frame.file_window, &frame.values);
            let image = match &frame.voi_lut {
                Some(lut) => render::render_voi_lut(&frame, lut),
                None => render::render(&frame, window),
            };
            let t_render = t.elapsed().as_secs_f64() * 1e3;
            std::hint::black_box(&image);
            megapixels = f64::from(frame.width) * f64::from(frame.height) / 1e6;
            if i > 0 {
                decode.push(t_decode);
                render_ms.push(t_render);
            }
        }
        if failed {
            continue;
        }
        let (d, r) = (median(decode), median(render_ms));
        let line = serde_json::json!({
            "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "transfer_syntax": ts,
            "megapixels": (megapixels * 1e4).round() / 1e4,
            "decode_ms_median": (d * 1e3).round() / 1e3,
            "render_ms_median": (r * 1e3).round() / 1e3,
            "ms_per_megapixel": ((d + r) / megapixels * 1e3).round() / 1e3,
        });
        println!("{line}");
    }
}
