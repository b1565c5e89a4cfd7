//! `llava-med cache`: list and remove the quantised weights kept between loads.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Subcommand;
use llava_med::quant::cache;
use llava_med::quant::cached_models::{self, CachedModel, Removed};

/// What to do with the cache.
#[derive(Subcommand)]
pub enum CacheAction {
    /// Each cached checkpoint: where it is, what is kept for it, how big, and whether it still exists.
    List {
        /// One JSON object (the root, its checkpoints, their entries) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove a checkpoint's quantised weights (its next quantised load quantises it again), or every
    /// checkpoint's.
    Remove {
        /// The checkpoint folder (it need no longer exist).
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        model: Option<PathBuf>,
        /// Every checkpoint's.
        #[arg(long)]
        all: bool,
    },
    /// Remove the weights of checkpoints that no longer exist and files of writes interrupted over an
    /// hour ago.
    Prune,
}

/// Runs `action` on the cache under `root` (`--quant-cache`, else the default).
pub fn run(action: CacheAction, root: Option<&str>) -> Result<()> {
    let root = match root {
        Some(value) => cache::parse_root(value),
        None => cache::default_root(),
    };
    let Some(root) = root else {
        bail!(
            "no quantised-weights cache: {} or --quant-cache is off; pass --quant-cache DIR",
            cache::ENV
        );
    };
    match action {
        CacheAction::List { json } => list(&root, json),
        CacheAction::Remove { model, all } => {
            let targets = match model {
                Some(model) => match cached_models::find(&root, &model)? {
                    Some(found) => vec![found],
                    None => bail!(
                        "{}: nothing cached for this checkpoint under {}",
                        model.display(),
                        root.display()
                    ),
                },
                None => {
                    debug_assert!(all);
                    cached_models::list(&root)?
                }
            };
            let mut removed = Removed::default();
            for target in &targets {
                removed.add(&cached_models::remove(target)?);
            }
            report(&root, &removed);
            Ok(())
        }
        CacheAction::Prune => {
            let removed = cached_models::prune(&root)?;
            report(&root, &removed);
            Ok(())
        }
    }
}

fn list(root: &Path, json: bool) -> Result<()> {
    let models = cached_models::list(root)?;
    let total: u64 = models.iter().map(|m| m.bytes).sum();
    if json {
        let value = serde_json::json!({"root": root, "bytes": total, "models": models});
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let count = match models.len() {
        1 => "1 checkpoint".to_string(),
        n => format!("{n} checkpoints"),
    };
    println!(
        "quantised-weights cache {}: {count}, {}",
        root.display(),
        size(total)
    );
    for m in &models {
        print_model(m);
    }
    Ok(())
}

fn print_model(m: &CachedModel) {
    let state = match (&m.model, m.model_exists) {
        (Some(_), true) => "",
        (Some(_), false) => " (no longer exists: `llava-med cache prune` removes its weights)",
        (None, _) => " (checkpoint unknown: cached before manifests were written)",
    };
    let name = m
        .model
        .as_deref()
        .map_or_else(|| "?".to_string(), |p| p.display().to_string());
    println!("\n{name}{state}");
    println!("  in {}", m.folder.display());
    for k in &m.kinds {
        let matrices = if k.entries == 1 { "matrix" } else { "matrices" };
        println!(
            "  {}-bit codes, {} model: {} {matrices}, {}",
            k.bits,
            k.dtype,
            k.entries,
            size(k.bytes)
        );
    }
    if let Some(secs) = m.last_written {
        println!("  last written {}", super::utc_iso(secs));
    }
    if m.partial_files > 0 {
        println!(
            "  {} unfinished file(s): a load writing now, or one interrupted (`prune` removes those over an hour old)",
            m.partial_files
        );
    }
}

fn report(root: &Path, removed: &Removed) {
    println!(
        "removed {} file(s), {}, from {} ({} checkpoint folder(s) emptied)",
        removed.files,
        size(removed.bytes),
        root.display(),
        removed.folders
    );
}

/// A size in decimal units, as disk sizes are shown.
fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}
