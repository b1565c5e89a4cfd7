//! The quantised-weights cache: the packed form of each matrix a checkpoint was quantised to, kept on disk
//! so the next load reads it instead of converting and quantising again (a 7B model at 4 bits: ~55 s of a
//! 2-core laptop's time at every start, and 15 GB of f16 read). One small safetensors file per matrix
//! (`codes`, `group_params`, `supers`), written to a temporary name and renamed, so an interrupted load
//! leaves whole entries or none; each file records a fingerprint of what it was made from (the source
//! tensors' files with their sizes and modification times, the tensors' names, types, shapes and places in
//! the files, the bits, the float type and the quantiser's version) and is used only when the fingerprint
//! matches; otherwise the matrix is quantised again and the entry overwritten. A file that cannot be read
//! is reported and replaced, never trusted and never fatal.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use super::pack::{self, GROUP, Packed};
use crate::host_memory::{convert_in_parallel, zeroed_on_huge_pages};

/// Environment variable naming the cache's root folder (`off` for no cache).
pub const ENV: &str = "LLAVA_MED_QUANT_CACHE";

/// Version of the entries' layout; entries of another version are not read.
const FORMAT: &str = "llava-med packed matrix v1";

/// Metadata key of an entry's fingerprint.
const FINGERPRINT_KEY: &str = "fingerprint";

/// The file in each checkpoint's cache folder naming the checkpoint (`{"model": "<full path>"}`), so the
/// folder can be listed and pruned without the checkpoint ([`super::cached_models`]).
pub const MANIFEST: &str = "model.json";

/// How an entry's file name ends: `.q<bits>.<float type>` then this.
pub const ENTRY_SUFFIX: &str = ".safetensors";

/// Disk space the cache leaves free: it stops writing rather than fill a disk the rest of the machine
/// needs (a 7B model's entries are 4.3 GB at int4, 7.6 GB at int8).
pub const KEEP_FREE_BYTES: u64 = 2_000_000_000;

/// How a temporary file being written into a cache folder ends (`.<entry name>.<process id>.partial`).
pub const PARTIAL_SUFFIX: &str = ".partial";

/// The root folder for caches unless told otherwise: `$LLAVA_MED_QUANT_CACHE` (`off` or empty: none), else
/// `llava-med/quantized` in the user's cache folder (`$XDG_CACHE_HOME`, `~/.cache`, `%LOCALAPPDATA%`).
pub fn default_root() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os(ENV) {
        return parse_root(&v.to_string_lossy());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })
        .or_else(|| std::env::var_os("LOCALAPPDATA").map(PathBuf::from))?;
    Some(base.join("llava-med").join("quantized"))
}

/// A `--quant-cache` value: `off`, `none` or empty for no cache, else the root folder.
pub fn parse_root(value: &str) -> Option<PathBuf> {
    match value.trim() {
        "" | "off" | "none" => None,
        dir => Some(PathBuf::from(dir)),
    }
}

/// The cache of one checkpoint folder: `root/<folder name>-<hash of its full path>/`, so each model's
/// entries can be found and deleted together.
#[derive(Debug, Clone)]
pub struct QuantCache {
    dir: PathBuf,
    /// The checkpoint folder's full path.
    model: PathBuf,
    /// Disk space left free ([`KEEP_FREE_BYTES`]).
    keep_free: u64,
}

/// What a cache lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// The entry, made from the same tensors by the same quantiser.
    Hit(Packed),
    /// No entry.
    Missing,
    /// An entry made from something else (the checkpoint changed, or another quantiser made it).
    Stale,
    /// An entry that could not be read: why.
    Unreadable(String),
}

/// What one load did with the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheTally {
    /// Matrices read from the cache.
    pub read: usize,
    /// Matrices quantised (not in the cache, or stale).
    pub quantized: usize,
    /// Entries written.
    pub written: usize,
    /// Why writing stopped, if it did (the load goes on without the cache).
    pub write_error: Option<String>,
}

impl CacheTally {
    /// Adds another loader's counts (a vision tower loaded from its own folder).
    pub fn add(&mut self, other: &CacheTally) {
        self.read += other.read;
        self.quantized += other.quantized;
        self.written += other.written;
        if self.write_error.is_none() {
            self.write_error.clone_from(&other.write_error);
        }
    }
}

impl fmt::Display for CacheTally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} matrices read from the cache, {} quantised, {} written",
            self.read, self.quantized, self.written
        )?;
        if let Some(e) = &self.write_error {
            write!(f, " (writing stopped: {e})")?;
        }
        Ok(())
    }
}

/// One matrix's entry: its file and the fingerprint of what it is made from.
#[derive(Debug, Clone)]
pub struct Entry {
    file: PathBuf,
    fingerprint: String,
    rows: usize,
    cols: usize,
    bits: usize,
}

impl QuantCache {
    /// The cache of the checkpoint in `model_dir` under `root`.
    pub fn for_model(root: &Path, model_dir: &Path) -> Self {
        let full = std::fs::canonicalize(model_dir).unwrap_or_else(|_| model_dir.to_path_buf());
        let name = full
            .file_name()
            .map(|n| file_safe(&n.to_string_lossy()))
            .unwrap_or_else(|| "model".into());
        let hash = hex(&Sha256::digest(full.to_string_lossy().as_bytes())[..8]);
        Self {
            dir: root.join(format!("{name}-{hash}")),
            model: full,
            keep_free: KEEP_FREE_BYTES,
        }
    }

    /// The folder this checkpoint's entries are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry of a `[rows, cols]` matrix named `label` (its first tensor's name) quantised to `bits` in
    /// float type `dtype`; `sources` fingerprints the tensors it is made from (see the module's doc).
    pub fn entry(
        &self,
        label: &str,
        parts: usize,
        [rows, cols]: [usize; 2],
        bits: usize,
        dtype: DType,
        sources: &str,
    ) -> Entry {
        let dtype = format!("{dtype:?}").to_lowercase();
        let fused = if parts > 1 {
            format!("+{}", parts - 1)
        } else {
            String::new()
        };
        let file = self.dir.join(format!(
            "{}{fused}.q{bits}.{dtype}{ENTRY_SUFFIX}",
            file_safe(label)
        ));
        let fingerprint = format!(
            "{FORMAT}; quantiser {}; {rows}x{cols} at {bits} bits, {dtype}; {sources}",
            pack::QUANTIZER_VERSION
        );
        Entry {
            file,
            fingerprint,
            rows,
            cols,
            bits,
        }
    }

    /// Looks `entry` up.
    pub fn read(&self, entry: &Entry) -> Lookup {
        let file = match File::open(&entry.file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Missing,
            Err(e) => return Lookup::Unreadable(e.to_string()),
        };
        // SAFETY: read-only; entries are replaced by rename, never written in place.
        let map = match unsafe { Mmap::map(&file) } {
            Ok(m) => m,
            Err(e) => return Lookup::Unreadable(e.to_string()),
        };
        match decode(&map, entry) {
            Ok(Some(p)) => Lookup::Hit(p),
            Ok(None) => Lookup::Stale,
            Err(why) => Lookup::Unreadable(why),
        }
    }

    /// Writes `packed` as `entry` (a temporary file renamed into place).
    pub fn write(&self, entry: &Entry, packed: &Packed) -> std::io::Result<()> {
        self.write_encoded(&EncodedEntry::new(entry, packed))
    }

    /// Writes an encoded entry (a temporary file renamed into place), and the folder's manifest first if
    /// it has none.
    pub fn write_encoded(&self, encoded: &EncodedEntry) -> std::io::Result<()> {
        let entry = &encoded.entry;
        std::fs::create_dir_all(&self.dir)?;
        // Where the free space cannot be told (an unusual file system), writing goes ahead.
        if let Some(available) = free_disk_space(&self.dir)
            && available < encoded.bytes() + self.keep_free
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "{:.2} GB free on its disk, and the cache leaves {:.1} GB free; free some space or pass \
                     --quant-cache DIR on another disk",
                    available as f64 / 1e9,
                    self.keep_free as f64 / 1e9
                ),
            ));
        }
        let manifest = self.dir.join(MANIFEST);
        if !manifest.is_file() {
            let json = serde_json::json!({ "model": self.model });
            self.write_atomically(&manifest, |tmp| std::fs::write(tmp, format!("{json}\n")))?;
        }
        self.write_atomically(&entry.file, |tmp| write_entry(tmp, encoded))
    }

    /// Writes `file` through `write` to a temporary name, then renames it into place.
    fn write_atomically(
        &self,
        file: &Path,
        write: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        let tmp = self
            .dir
            .join(format!(".{name}.{}{PARTIAL_SUFFIX}", std::process::id()));
        let result = write(&tmp).and_then(|()| {
            // Renaming over an entry another process is reading is safe on Unix (it keeps the old file).
            std::fs::rename(&tmp, file)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

impl Entry {
    /// The entry's file.
    pub fn file(&self) -> &Path {
        &self.file
    }
}

/// The packed matrix in an entry's bytes; `None` when it was made from something else.
fn decode(bytes: &[u8], entry: &Entry) -> Result<Option<Packed>, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not a valid entry ({e})"))?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let fingerprint = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(FINGERPRINT_KEY));
    if fingerprint != Some(&entry.fingerprint) {
        return Ok(None);
    }
    let Entry {
        rows, cols, bits, ..
    } = *entry;
    let groups = cols / GROUP;
    let gps = pack::groups_per_super(groups);
    let part = |name: &str, dtype: Dtype, shape: [usize; 2]| {
        let t = st
            .tensor(name)
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        if t.dtype() != dtype || t.shape() != shape {
            return Err(format!(
                "tensor `{name}` is {:?} {:?}, expected {dtype:?} {shape:?}",
                t.dtype(),
                t.shape()
            ));
        }
        Ok(t.data())
    };
    let codes = part("codes", Dtype::I32, [rows, cols * bits / 32])?;
    let params = part("group_params", Dtype::I32, [rows, groups.div_ceil(2)])?;
    let supers = part("supers", Dtype::F32, [rows, 2 * groups / gps])?;
    let mut packed = Packed {
        rows,
        cols,
        bits,
        groups_per_super: gps,
        codes: zeroed_on_huge_pages(codes.len() / 4),
        group_params: vec![0; params.len() / 4],
        supers: vec![0.0; supers.len() / 4],
    };
    let word = |b: &[u8]| [b[0], b[1], b[2], b[3]];
    convert_in_parallel(codes, 4, &mut packed.codes, |b| i32::from_le_bytes(word(b)));
    convert_in_parallel(params, 4, &mut packed.group_params, |b| {
        i32::from_le_bytes(word(b))
    });
    convert_in_parallel(supers, 4, &mut packed.supers, |b| {
        f32::from_le_bytes(word(b))
    });
    Ok(Some(packed))
}

/// An entry's file contents, encoded on the loading thread so the packed matrix can go on to the device
/// while another thread writes them ([`super::cache_writer`]).
pub struct EncodedEntry {
    entry: Entry,
    codes: (Vec<usize>, Vec<u8>),
    group_params: (Vec<usize>, Vec<u8>),
    supers: (Vec<usize>, Vec<u8>),
}

impl EncodedEntry {
    /// `packed`'s parts as `entry`'s file holds them (little-endian words).
    pub fn new(entry: &Entry, p: &Packed) -> Self {
        let groups = p.cols / GROUP;
        Self {
            entry: entry.clone(),
            codes: (
                vec![p.rows, p.cols * p.bits / 32],
                le_bytes(&p.codes, |w| w.to_le_bytes()),
            ),
            group_params: (
                vec![p.rows, groups.div_ceil(2)],
                le_bytes(&p.group_params, |w| w.to_le_bytes()),
            ),
            supers: (
                vec![p.rows, 2 * groups / p.groups_per_super],
                le_bytes(&p.supers, |v| v.to_le_bytes()),
            ),
        }
    }

    /// The entry it is for.
    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// Bytes of its parts (its file is a few hundred bytes more).
    pub fn bytes(&self) -> u64 {
        (self.codes.1.len() + self.group_params.1.len() + self.supers.1.len()) as u64
    }
}

/// 4-byte values as their bytes, one plain copy loop (the compiler makes it a block copy on
/// little-endian machines; a flattening iterator measured far slower).
fn le_bytes<T: Copy>(values: &[T], to_le: impl Fn(T) -> [u8; 4]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * 4];
    for (o, &v) in out.chunks_exact_mut(4).zip(values) {
        o.copy_from_slice(&to_le(v));
    }
    out
}

fn write_entry(path: &Path, e: &EncodedEntry) -> std::io::Result<()> {
    fn view(
        dtype: Dtype,
        (shape, data): &(Vec<usize>, Vec<u8>),
    ) -> std::io::Result<TensorView<'_>> {
        TensorView::new(dtype, shape.clone(), data).map_err(std::io::Error::other)
    }
    let tensors = [
        ("codes", view(Dtype::I32, &e.codes)?),
        ("group_params", view(Dtype::I32, &e.group_params)?),
        ("supers", view(Dtype::F32, &e.supers)?),
    ];
    let meta = HashMap::from([(FINGERPRINT_KEY.to_string(), e.entry.fingerprint.clone())]);
    safetensors::serialize_to_file(tensors, Some(meta), path).map_err(std::io::Error::other)
}

/// Free bytes on the disk holding `dir` (the mounted disk whose mount point is the longest prefix of its
/// full path), where the system says.
fn free_disk_space(dir: &Path) -> Option<u64> {
    let full = std::fs::canonicalize(dir).ok()?;
    let disks = sysinfo::Disks::new_with_refreshed_list();
    disks
        .list()
        .iter()
        .filter(|d| full.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| d.available_space())
}

/// `name` with anything but ASCII letters, digits, `.`, `_` and `-` replaced by `_`.
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::random_values;

    /// A scratch root folder, removed when dropped.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cache(tag: &str) -> (Scratch, QuantCache) {
        let root =
            std::env::temp_dir().join(format!("llava-med-qcache-{tag}-{}", std::process::id()));
        let cache = QuantCache::for_model(&root, Path::new("/models/llava-med 7b"));
        (Scratch(root), cache)
    }

    #[test]
    fn entries_round_trip_and_only_for_their_fingerprint() {
        let (_root, cache) = cache("round-trip");
        let folder = cache.dir().file_name().unwrap().to_string_lossy();
        assert!(folder.starts_with("llava-med_7b-"), "{folder}");
        let (rows, cols) = (5, 96);
        let values = random_values(7, rows * cols);
        for bits in [4, 8] {
            let packed = pack::quantize(&values, rows, cols, bits, DType::F16);
            let entry = cache.entry(
                "m.q_proj",
                3,
                [rows, cols],
                bits,
                DType::F16,
                "a.safetensors",
            );
            assert!(matches!(cache.read(&entry), Lookup::Missing));
            cache.write(&entry, &packed).unwrap();
            let Lookup::Hit(back) = cache.read(&entry) else {
                panic!("written entry not found")
            };
            assert_eq!(
                (back.rows, back.cols, back.bits, back.groups_per_super),
                (rows, cols, bits, packed.groups_per_super)
            );
            assert_eq!(back.codes, packed.codes);
            assert_eq!(back.group_params, packed.group_params);
            assert_eq!(back.supers, packed.supers);
            // Another source, float type or shape is another fingerprint.
            for other in [
                cache.entry(
                    "m.q_proj",
                    3,
                    [rows, cols],
                    bits,
                    DType::F16,
                    "b.safetensors",
                ),
                cache.entry(
                    "m.q_proj",
                    3,
                    [rows, cols],
                    bits,
                    DType::BF16,
                    "a.safetensors",
                ),
            ] {
                if other.file == entry.file {
                    assert!(matches!(cache.read(&other), Lookup::Stale));
                } else {
                    assert!(matches!(cache.read(&other), Lookup::Missing));
                }
            }
        }
        // No temporary files left behind.
        let names: Vec<String> = std::fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".partial")), "{names:?}");
        assert_eq!(names.len(), 3, "{names:?}");
        // The manifest names the checkpoint.
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(cache.dir().join(MANIFEST)).unwrap()).unwrap();
        assert_eq!(manifest["model"], "/models/llava-med 7b");
    }

    #[test]
    fn damaged_entries_are_reported_not_trusted() {
        let (_root, cache) = cache("damaged");
        let (rows, cols) = (3, 64);
        let packed = pack::quantize(&random_values(1, rows * cols), rows, cols, 4, DType::F32);
        let entry = cache.entry("w", 1, [rows, cols], 4, DType::F32, "src");
        cache.write(&entry, &packed).unwrap();
        let full = std::fs::read(entry.file()).unwrap();
        // Truncated (a disk that filled up under another tool, a copy cut short).
        std::fs::write(entry.file(), &full[..full.len() - 10]).unwrap();
        let Lookup::Unreadable(why) = cache.read(&entry) else {
            panic!("a truncated entry was read")
        };
        assert!(why.contains("not a valid entry"), "{why}");
        // The right fingerprint over parts of the wrong shape (an entry for another matrix copied here).
        let other = cache.entry("w", 1, [rows + 1, cols], 4, DType::F32, "src");
        let wrong = QuantCache {
            dir: cache.dir().join("other"),
            ..cache.clone()
        };
        let mut bigger = pack::quantize(
            &random_values(1, (rows + 1) * cols),
            rows + 1,
            cols,
            4,
            DType::F32,
        );
        bigger.rows = rows + 1;
        let forged = Entry {
            file: wrong.dir.join("w.safetensors"),
            fingerprint: entry.fingerprint.clone(),
            ..other
        };
        wrong.write(&forged, &bigger).unwrap();
        std::fs::copy(forged.file(), entry.file()).unwrap();
        let Lookup::Unreadable(why) = cache.read(&entry) else {
            panic!("an entry of the wrong shape was read")
        };
        assert!(why.contains("codes"), "{why}");
    }

    #[test]
    fn a_disk_about_to_fill_is_left_alone() {
        let (_root, cache) = cache("full");
        let packed = pack::quantize(&random_values(3, 2 * 64), 2, 64, 8, DType::F32);
        let entry = cache.entry("w", 1, [2, 64], 8, DType::F32, "src");
        // No disk has this much free.
        let cautious = QuantCache {
            keep_free: u64::MAX / 2,
            ..cache.clone()
        };
        let err = cautious.write(&entry, &packed).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::StorageFull);
        assert!(err.to_string().contains("GB free on its disk"), "{err}");
        assert!(matches!(cache.read(&entry), Lookup::Missing));
        cache.write(&entry, &packed).unwrap();
        assert!(matches!(cache.read(&entry), Lookup::Hit(_)));
    }

    #[test]
    fn roots_from_flags() {
        assert_eq!(parse_root("off"), None);
        assert_eq!(parse_root(" "), None);
        assert_eq!(parse_root("/tmp/q"), Some(PathBuf::from("/tmp/q")));
    }
}
