//! The checkpoints in a quantised-weights cache ([`super::cache`]): what each one's folder holds, and
//! removing them (`llava-med cache`). Only files the cache itself writes are ever removed (entries,
//! manifests, interrupted writes) and only inside the root's folders, so a root pointed at a folder that
//! holds anything else loses nothing else.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::cache::{ENTRY_SUFFIX, MANIFEST, PARTIAL_SUFFIX, QuantCache};
use crate::error::{Error, Result};

/// A temporary file older than this is an interrupted write, not one in progress.
pub const INTERRUPTED_AFTER: Duration = Duration::from_secs(3600);

/// One checkpoint's folder in the cache.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CachedModel {
    /// The folder.
    pub folder: PathBuf,
    /// The checkpoint folder its entries were made from (`None`: no readable manifest).
    pub model: Option<PathBuf>,
    /// Whether that checkpoint folder still exists.
    pub model_exists: bool,
    /// Its entries, by code width and float type.
    pub kinds: Vec<CachedKind>,
    /// Bytes of all the cache's files in the folder.
    pub bytes: u64,
    /// Temporary files of writes in progress or interrupted.
    pub partial_files: usize,
    /// When an entry was last written, in seconds since the Unix epoch.
    pub last_written: Option<u64>,
}

/// The entries of one code width and float type.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CachedKind {
    /// Bits per weight code: 4 (an int4 load's matrices) or 8 (an int8 load's, and an int4 load's output
    /// head, kept one step finer).
    pub bits: usize,
    /// The float type the model was loaded in (`f16`, `bf16`, `f32`).
    pub dtype: String,
    /// Matrices.
    pub entries: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// What a removal removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Removed {
    /// Files removed.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Checkpoint folders removed whole.
    pub folders: usize,
}

impl Removed {
    /// Adds another removal's counts.
    pub fn add(&mut self, other: &Removed) {
        self.files += other.files;
        self.bytes += other.bytes;
        self.folders += other.folders;
    }
}

/// What a file in a checkpoint's cache folder is.
#[derive(Debug, PartialEq, Eq)]
enum CacheFile {
    Entry {
        bits: usize,
        dtype: String,
    },
    Manifest,
    Partial,
    /// Not the cache's: never removed.
    Other,
}

/// Classifies a file name as [`QuantCache`] writes them: `<tensor>[+N].q<bits>.<dtype>.safetensors`,
/// `model.json`, `.<name>.<pid>.partial`.
fn classify(name: &str) -> CacheFile {
    if name == MANIFEST {
        return CacheFile::Manifest;
    }
    if name.starts_with('.') && name.ends_with(PARTIAL_SUFFIX) {
        return CacheFile::Partial;
    }
    let entry = name.strip_suffix(ENTRY_SUFFIX).and_then(|stem| {
        let (rest, dtype) = stem.rsplit_once('.')?;
        let (_, bits) = rest.rsplit_once(".q")?;
        let bits = bits.parse().ok()?;
        (!dtype.is_empty() && dtype.chars().all(|c| c.is_ascii_alphanumeric())).then(|| {
            CacheFile::Entry {
                bits,
                dtype: dtype.to_string(),
            }
        })
    });
    entry.unwrap_or(CacheFile::Other)
}

/// A file in a checkpoint's cache folder.
struct FolderFile {
    path: PathBuf,
    kind: CacheFile,
    bytes: u64,
    modified: Option<SystemTime>,
}

/// A cache folder's files (not its subfolders), in name order.
fn files_of(folder: &Path) -> Result<Vec<FolderFile>> {
    let mut files = Vec::new();
    for item in std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))? {
        let item = item.map_err(|e| Error::io(folder, e))?;
        let path = item.path();
        let meta = item.metadata().map_err(|e| Error::io(&path, e))?;
        if !meta.is_file() {
            continue;
        }
        files.push(FolderFile {
            kind: classify(&item.file_name().to_string_lossy()),
            path,
            bytes: meta.len(),
            modified: meta.modified().ok(),
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// The checkpoint a folder's manifest names, if it has a readable one.
fn manifest_model(folder: &Path) -> Option<PathBuf> {
    let bytes = std::fs::read(folder.join(MANIFEST)).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("model")?.as_str().map(PathBuf::from)
}

/// What one checkpoint's cache folder holds; `None` when it holds none of the cache's files.
fn describe(folder: &Path) -> Result<Option<CachedModel>> {
    let files = files_of(folder)?;
    if files.iter().all(|f| f.kind == CacheFile::Other) {
        return Ok(None);
    }
    let model = manifest_model(folder);
    let mut cached = CachedModel {
        folder: folder.to_path_buf(),
        model_exists: model.as_deref().is_some_and(Path::is_dir),
        model,
        kinds: Vec::new(),
        bytes: 0,
        partial_files: 0,
        last_written: None,
    };
    for FolderFile {
        kind,
        bytes,
        modified,
        ..
    } in files
    {
        match kind {
            CacheFile::Entry { bits, dtype } => {
                let at = cached
                    .kinds
                    .iter()
                    .position(|k| k.bits == bits && k.dtype == dtype)
                    .unwrap_or_else(|| {
                        cached.kinds.push(CachedKind {
                            bits,
                            dtype,
                            entries: 0,
                            bytes: 0,
                        });
                        cached.kinds.len() - 1
                    });
                cached.kinds[at].entries += 1;
                cached.kinds[at].bytes += bytes;
                let secs = modified
                    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs());
                cached.last_written = cached.last_written.max(secs);
            }
            CacheFile::Partial => cached.partial_files += 1,
            CacheFile::Manifest | CacheFile::Other => {}
        }
        cached.bytes += bytes;
    }
    cached
        .kinds
        .sort_by(|a, b| (a.bits, &a.dtype).cmp(&(b.bits, &b.dtype)));
    Ok(Some(cached))
}

/// Every checkpoint cached under `root`, in folder order (none when `root` does not exist).
pub fn list(root: &Path) -> Result<Vec<CachedModel>> {
    let items = match std::fs::read_dir(root) {
        Ok(items) => items,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(root, e)),
    };
    let mut folders = Vec::new();
    for item in items {
        let item = item.map_err(|e| Error::io(root, e))?;
        if item
            .file_type()
            .map_err(|e| Error::io(item.path(), e))?
            .is_dir()
        {
            folders.push(item.path());
        }
    }
    folders.sort();
    let mut models = Vec::new();
    for folder in folders {
        models.extend(describe(&folder)?);
    }
    Ok(models)
}

/// The cache of the checkpoint in `model_dir`, which need no longer exist: the folder its path hashes to,
/// or one whose manifest names it.
pub fn find(root: &Path, model_dir: &Path) -> Result<Option<CachedModel>> {
    let hashed = QuantCache::for_model(root, model_dir);
    if hashed.dir().is_dir()
        && let Some(found) = describe(hashed.dir())?
    {
        return Ok(Some(found));
    }
    let wanted = std::fs::canonicalize(model_dir)
        .or_else(|_| std::path::absolute(model_dir))
        .unwrap_or_else(|_| model_dir.to_path_buf());
    Ok(list(root)?
        .into_iter()
        .find(|m| m.model.as_deref() == Some(&wanted)))
}

/// Removes the cache's files in `cached`'s folder whose kind `which` accepts, then the folder if nothing
/// else is left in it.
fn remove_files(
    cached: &CachedModel,
    which: impl Fn(&CacheFile, Option<SystemTime>) -> bool,
) -> Result<Removed> {
    let mut removed = Removed::default();
    for file in files_of(&cached.folder)? {
        if file.kind == CacheFile::Other || !which(&file.kind, file.modified) {
            continue;
        }
        match std::fs::remove_file(&file.path) {
            Ok(()) => {
                removed.files += 1;
                removed.bytes += file.bytes;
            }
            // Renamed or removed meanwhile by a load or another removal.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&file.path, e)),
        }
    }
    // Only an empty folder goes (`remove_dir` refuses others): a file we did not write stays with it.
    if std::fs::remove_dir(&cached.folder).is_ok() {
        removed.folders += 1;
    }
    Ok(removed)
}

/// Removes a checkpoint's cached weights (the next quantised load quantises it again). A load writing
/// into the folder meanwhile loses its unfinished entries, never a finished one's integrity.
pub fn remove(cached: &CachedModel) -> Result<Removed> {
    remove_files(cached, |_, _| true)
}

/// Removes the cached weights of checkpoints that no longer exist, and writes interrupted more than
/// [`INTERRUPTED_AFTER`] ago. Folders without a manifest are left alone (what they were made from is
/// unknown).
pub fn prune(root: &Path) -> Result<Removed> {
    let now = SystemTime::now();
    let mut removed = Removed::default();
    for cached in list(root)? {
        let gone = cached.model.is_some() && !cached.model_exists;
        let done = if gone {
            remove(&cached)?
        } else {
            remove_files(&cached, |kind, modified| {
                *kind == CacheFile::Partial
                    && modified
                        .and_then(|t| now.duration_since(t).ok())
                        .is_some_and(|age| age > INTERRUPTED_AFTER)
            })?
        };
        removed.add(&done);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_classified_as_the_cache_writes_them() {
        let entry = |bits: usize, dtype: &str| CacheFile::Entry {
            bits,
            dtype: dtype.into(),
        };
        assert_eq!(
            classify("model.layers.0.self_attn.q_proj.weight+2.q4.f16.safetensors"),
            entry(4, "f16")
        );
        assert_eq!(
            classify("lm_head.weight.q8.bf16.safetensors"),
            entry(8, "bf16")
        );
        assert_eq!(classify("model.json"), CacheFile::Manifest);
        assert_eq!(
            classify(".lm_head.weight.q8.f32.safetensors.4242.partial"),
            CacheFile::Partial
        );
        for other in [
            "model.safetensors",
            "notes.txt",
            "w.qx.f16.safetensors",
            "w.q4..safetensors",
            "partial",
            "config.json",
        ] {
            assert_eq!(classify(other), CacheFile::Other, "{other}");
        }
    }
}
