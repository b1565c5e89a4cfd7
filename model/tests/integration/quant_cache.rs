//! The quantised-weights cache (`--quant-cache`): a second load reads what the first quantised, with the
//! same results; a changed checkpoint, a damaged entry or a cache that cannot be written costs a
//! re-quantisation, never a wrong model or a failed load.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use burn::tensor::{DType, Device, Tensor};
use llava_med::LlavaModel;
use llava_med::quant::Quantization;
use llava_med::quant::cache::CacheTally;

use crate::common::{Scratch, copy_dir, fixture, to_vec};

/// Loads `dir` quantised with the cache under `root`: the logits of a prompt with an image and what the
/// load did with the cache.
fn load(dir: &Path, quant: Quantization, root: Option<&Path>) -> (Vec<f32>, Option<CacheTally>) {
    let device = Device::flex();
    let m = LlavaModel::load_quantized(dir, &device, DType::F32, Some(64), quant, root).unwrap();
    let pixels = Tensor::<4>::ones([1, 3, 56, 56], &device) * 0.25;
    let feats = m.encode_images(pixels).unwrap();
    let ids: Vec<i64> = vec![1, llava_med::IMAGE_SLOT, 22, 57, 301, 9, 144];
    let embeds = m.embed_sequence(&ids, Some(&feats)).unwrap();
    let logits = to_vec(m.forward(embeds, &mut m.new_cache()).unwrap());
    (logits, m.quant_cache)
}

/// The entries under `root` (each checkpoint's folder also holds its manifest, `model.json`).
fn entries(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for model in std::fs::read_dir(root).unwrap() {
        for e in std::fs::read_dir(model.unwrap().path()).unwrap() {
            let path = e.unwrap().path();
            if path.file_name().unwrap() != "model.json" {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn a_second_load_reads_what_the_first_quantised() {
    let scratch = Scratch::new("qcache");
    let dir = scratch.0.join("model");
    copy_dir(&fixture("tiny-llava-med-mistral"), &dir);
    let root = scratch.0.join("cache");
    let int4 = Quantization::Int4;
    let (want, none) = load(&dir, int4, None);
    assert_eq!(none, None, "no cache asked for, none used");

    // First load: every matrix quantised and written.
    let (got, tally) = load(&dir, int4, Some(&root));
    let tally = tally.unwrap();
    let n = tally.quantized;
    assert!(n >= 10, "{tally}");
    assert_eq!((tally.read, tally.written, tally.write_error), (0, n, None));
    assert_eq!(got, want, "quantising with a cache changed the model");
    let files = entries(&root);
    assert_eq!(files.len(), n, "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| f.extension().is_some_and(|e| e == "safetensors"))
    );

    // Second load: every matrix read, the same logits bit for bit.
    let (got, tally) = load(&dir, int4, Some(&root));
    assert_eq!(
        tally.unwrap(),
        CacheTally {
            read: n,
            ..CacheTally::default()
        }
    );
    assert_eq!(got, want, "the cached model differs");

    // int8 has entries of its own beside int4's.
    let (_, tally) = load(&dir, Quantization::Int8, Some(&root));
    let tally = tally.unwrap();
    assert!(
        tally.read == 0 && tally.written == tally.quantized && tally.written > 0,
        "{tally}"
    );
    let (_, tally) = load(&dir, int4, Some(&root));
    assert_eq!(
        tally.unwrap().read,
        n,
        "int8's load replaced int4's entries"
    );

    // A shard rewritten (a new download, a fine-tune saved over it): its matrices are quantised again.
    let shard = dir.join("model-00002-of-00002.safetensors");
    let later = SystemTime::now() + Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let (got, tally) = load(&dir, int4, Some(&root));
    let tally = tally.unwrap();
    assert!(tally.quantized > 0 && tally.read > 0, "{tally}");
    assert_eq!(
        (tally.read + tally.quantized, tally.written),
        (n, tally.quantized)
    );
    assert_eq!(got, want);

    // A damaged entry is reported, replaced and not trusted.
    let victim = entries(&root)
        .into_iter()
        .find(|f| f.to_string_lossy().contains("q4"))
        .unwrap();
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    let (got, tally) = load(&dir, int4, Some(&root));
    let tally = tally.unwrap();
    assert_eq!(
        (tally.read, tally.quantized, tally.written),
        (n - 1, 1, 1),
        "{tally}"
    );
    assert_eq!(got, want);
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        bytes,
        "the entry was not rewritten"
    );

    // A cache that cannot be written (here its root is a file): the load goes on and says why.
    let blocked = scratch.0.join("not-a-folder");
    std::fs::write(&blocked, b"").unwrap();
    let (got, tally) = load(&dir, int4, Some(&blocked));
    let tally = tally.unwrap();
    assert_eq!((tally.read, tally.quantized, tally.written), (0, n, 0));
    assert!(
        tally
            .write_error
            .as_deref()
            .is_some_and(|e| e.contains("not-a-folder")),
        "{tally}"
    );
    assert_eq!(got, want);
}
