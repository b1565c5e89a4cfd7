//! `llava-med cache`: what the quantised-weights cache keeps, pruning and removing it without touching
//! anything else, and where the cache is when no flag says.

use std::path::Path;
use std::time::{Duration, SystemTime};

use llava_med::quant::cache::ENV;
use serde_json::Value;

use crate::common::{Scratch, copy_dir, fixture, llava_med, llava_med_ok};

/// Loads the checkpoint in `model` with `--quant quant` through `command generate` (one token), with
/// `extra` flags.
fn quantise(model: &Path, quant: &str, command: &mut std::process::Command, extra: &[&str]) {
    let out = command
        .args(["generate", "--device", "cpu", "--prompt", "Hi"])
        .args(["--max-new-tokens", "1", "--quant", quant, "--model"])
        .arg(model)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn list(root: &Path) -> Value {
    let out = llava_med_ok([
        "cache",
        "list",
        "--json",
        "--quant-cache",
        root.to_str().unwrap(),
    ]);
    serde_json::from_slice(&out).unwrap()
}

fn bits(model: &Value) -> Vec<u64> {
    model["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["bits"].as_u64().unwrap())
        .collect()
}

fn cache_run(root: &Path, args: &[&str]) -> std::process::Output {
    llava_med()
        .arg("cache")
        .args(args)
        .args(["--quant-cache", root.to_str().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn list_prune_and_remove_touch_only_the_caches_files() {
    let scratch = Scratch::new("cache-command");
    let root = scratch.0.join("cache");
    let (a, b) = (scratch.0.join("a"), scratch.0.join("b"));
    copy_dir(&fixture("tiny-llava-med-mistral"), &a);
    copy_dir(&fixture("tiny-llava-med-mistral"), &b);
    let flag = ["--quant-cache", root.to_str().unwrap()];
    quantise(&a, "int4", &mut llava_med(), &flag);
    quantise(&b, "int8", &mut llava_med(), &flag);

    let listed = list(&root);
    let models = listed["models"].as_array().unwrap();
    assert_eq!(models.len(), 2, "{listed:#}");
    let find = |listed: &Value, dir: &Path| -> Option<Value> {
        let full = std::fs::canonicalize(dir).unwrap_or(dir.to_path_buf());
        listed["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["model"] == full.to_str().unwrap())
            .cloned()
    };
    let (ma, mb) = (find(&listed, &a).unwrap(), find(&listed, &b).unwrap());
    // int4 keeps its output head at 8 bits; int8 keeps its head in the float type (not cached).
    assert_eq!(bits(&ma), [4, 8], "{ma:#}");
    assert_eq!(bits(&mb), [8], "{mb:#}");
    assert_eq!(ma["kinds"][1]["entries"], 1, "{ma:#}");
    assert!(ma["model_exists"].as_bool().unwrap());
    let total = listed["bytes"].as_u64().unwrap();
    assert_eq!(
        total,
        ma["bytes"].as_u64().unwrap() + mb["bytes"].as_u64().unwrap()
    );
    assert!(total > 100_000, "{listed:#}");

    // Beside the entries: a file of the user's, a write interrupted two hours ago, one in progress, and
    // a folder that is not a checkpoint's.
    let folder_a = Path::new(ma["folder"].as_str().unwrap()).to_path_buf();
    std::fs::write(folder_a.join("notes.txt"), "mine").unwrap();
    let old = folder_a.join(".w.q4.f32.safetensors.1.partial");
    std::fs::write(&old, vec![0u8; 1000]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    let fresh = folder_a.join(".w.q4.f32.safetensors.2.partial");
    std::fs::write(&fresh, vec![0u8; 500]).unwrap();
    std::fs::create_dir_all(root.join("unrelated")).unwrap();
    std::fs::write(root.join("unrelated/keep.bin"), "x").unwrap();
    assert_eq!(find(&list(&root), &a).unwrap()["partial_files"], 2);

    // Prune with both checkpoints present: only the interrupted write goes.
    let out = cache_run(&root, &["prune"]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("removed 1 file(s)"), "{said}");
    assert!(!old.exists() && fresh.exists());

    // The checkpoint moved away: listed as gone, and prune takes its weights, not the user's file.
    std::fs::rename(&a, scratch.0.join("a-moved")).unwrap();
    let gone = find(&list(&root), &a).unwrap();
    assert!(!gone["model_exists"].as_bool().unwrap(), "{gone:#}");
    let text = String::from_utf8_lossy(&cache_run(&root, &["list"]).stdout).into_owned();
    assert!(text.contains("no longer exists"), "{text}");
    assert!(text.contains("2 checkpoints"), "{text}");
    let out = cache_run(&root, &["prune"]);
    assert!(out.status.success(), "{out:?}");
    assert!(folder_a.join("notes.txt").exists());
    let names: Vec<_> = std::fs::read_dir(&folder_a).unwrap().collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let listed = list(&root);
    assert_eq!(listed["models"].as_array().unwrap().len(), 1, "{listed:#}");
    assert!(find(&listed, &b).is_some());

    // Remove one checkpoint by its folder, then all.
    let out = cache_run(&root, &["remove", "--model", b.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 checkpoint folder(s) emptied"),
        "{out:?}"
    );
    assert_eq!(list(&root)["models"].as_array().unwrap().len(), 0);
    quantise(&b, "int4", &mut llava_med(), &flag);
    assert_eq!(list(&root)["models"].as_array().unwrap().len(), 1);
    let out = cache_run(&root, &["remove", "--all"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(list(&root)["models"].as_array().unwrap().len(), 0);
    assert!(root.join("unrelated/keep.bin").exists());
    assert!(folder_a.join("notes.txt").exists());

    // A checkpoint with nothing cached, and no cache at all, are errors that say so.
    let out = cache_run(&root, &["remove", "--model", b.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nothing cached") && err.contains("/b"),
        "{err}"
    );
    let out = llava_med().args(["cache", "list"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--quant-cache DIR"), "{err}");
}

#[test]
fn the_cache_is_in_the_users_cache_folder_unless_switched_off() {
    let scratch = Scratch::new("cache-default");
    let model = scratch.0.join("model");
    copy_dir(&fixture("tiny-llava-med-mistral"), &model);
    let (home, xdg) = (scratch.0.join("home"), scratch.0.join("xdg"));
    let user = |xdg_cache: Option<&Path>| {
        let mut command = llava_med();
        command.env_remove(ENV).env("HOME", &home);
        match xdg_cache {
            Some(dir) => command.env("XDG_CACHE_HOME", dir),
            None => command.env_remove("XDG_CACHE_HOME"),
        };
        command
    };
    let folders =
        |root: &Path| -> usize { std::fs::read_dir(root).map_or(0, |items| items.count()) };

    // Off (what `llava_med()` sets for every other test): nothing written anywhere.
    quantise(&model, "int4", user(Some(&xdg)).env(ENV, "off"), &[]);
    assert!(!xdg.exists() && !home.exists());

    // $XDG_CACHE_HOME, else ~/.cache.
    quantise(&model, "int4", &mut user(Some(&xdg)), &[]);
    assert_eq!(folders(&xdg.join("llava-med/quantized")), 1);
    quantise(&model, "int4", &mut user(None), &[]);
    assert_eq!(folders(&home.join(".cache/llava-med/quantized")), 1);

    // `cache list` looks where loads write.
    let out = user(Some(&xdg))
        .args(["cache", "list", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        listed["root"],
        xdg.join("llava-med/quantized").to_str().unwrap()
    );
    assert_eq!(listed["models"].as_array().unwrap().len(), 1, "{listed:#}");

    // $LLAVA_MED_QUANT_CACHE names the root.
    let named = scratch.0.join("named");
    quantise(&model, "int8", user(Some(&xdg)).env(ENV, &named), &[]);
    assert_eq!(folders(&named), 1);
}
