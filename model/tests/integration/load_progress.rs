//! Load progress (`LoadOptions::progress`, the CLI's progress bar): every tensor a load takes is counted
//! once, so what a finished load counts plus the tensors it deliberately skipped is exactly the bytes of
//! the checkpoint's files; a load that reads the quantised-weights cache counts the same.

use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::tensor::{DType, Device};
use llava_med::llava::VisionWeightsSource;
use llava_med::load_progress::LoadProgress;
use llava_med::quant::Quantization;
use llava_med::weights::WeightFiles;
use llava_med::{LlavaModel, LoadOptions};

use crate::common::{Scratch, copy_dir, fixture};

/// Loads `dir` with `options` and a progress that records every report: (final done, total, reports).
fn load(dir: &Path, mut options: LoadOptions) -> (LlavaModel, u64, u64, Vec<(u64, u64)>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let progress = Arc::new(LoadProgress::new(move |done, total| {
        record.lock().unwrap().push((done, total))
    }));
    options.progress = Some(progress.clone());
    let m = LlavaModel::load_with(dir, &Device::flex(), DType::F32, &options).unwrap();
    let reports = seen.lock().unwrap().clone();
    (m, progress.done(), progress.total(), reports)
}

#[test]
fn progress_counts_every_tensor_taken_once() {
    let scratch = Scratch::new("progress");
    for name in ["tiny-llava-med-mistral", "tiny-llava-hf-llama"] {
        let dir = scratch.0.join(name);
        copy_dir(&fixture(name), &dir);
        let (m, done, total, reports) = load(&dir, LoadOptions::default());
        let mut files = vec![WeightFiles::open_dir(&dir).unwrap()];
        if let Some(VisionWeightsSource::ClipFolder(clip)) = &m.vision_weights {
            files.push(WeightFiles::open_dir(clip).unwrap());
        }
        let bytes = |tensor: &str| files.iter().map(|f| f.tensor_bytes(tensor)).sum::<u64>();
        let files_total: u64 = files.iter().map(WeightFiles::total_bytes).sum();
        let skipped: u64 = m.skipped_tensors.iter().map(|t| bytes(t)).sum();
        assert_eq!(total, files_total, "{name}");
        assert_eq!(
            done + skipped,
            total,
            "{name}: skipped {:?}",
            m.skipped_tensors
        );
        assert!(done > total / 2, "{name}: {done} of {total}");
        // Reported as it goes: never backwards, the last report the final count.
        assert!(reports.len() > 10, "{name}: {reports:?}");
        assert!(
            reports.windows(2).all(|w| w[1].0 >= w[0].0),
            "{name}: {reports:?}"
        );
        assert_eq!(reports.last().unwrap().0, done);

        // Quantised, first writing the cache and then reading it: the same count.
        let cached = LoadOptions {
            quantization: Quantization::Int4,
            quant_cache: Some(scratch.0.join(format!("cache-{name}"))),
            ..LoadOptions::default()
        };
        for round in ["writing", "reading"] {
            let (m, q_done, q_total, _) = load(&dir, cached.clone());
            let tally = m.quant_cache.unwrap();
            assert!(tally.read + tally.written > 0, "{name} {round}: {tally}");
            assert_eq!((q_done, q_total), (done, total), "{name} {round}");
        }
    }
}
