//! Shared helpers: fixture paths, reference tensors, comparisons.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// `model/tests/fixtures/<name>`, or under `LLAVA_MED_FIXTURES` when the test binary runs away from the
/// checkout it was built in (the GPU check carries it to another machine).
pub fn fixture(name: &str) -> PathBuf {
    match std::env::var_os("LLAVA_MED_FIXTURES") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    }
}

/// The `llava-med` command built with these tests, with the quantised-weights cache off (a test that
/// wants it names its own folder): tests never write to the user's cache folder.
pub fn llava_med() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_llava-med"));
    command.env(llava_med::quant::cache::ENV, "off");
    command
}

/// A `llava-med` run that must succeed (its stderr in the panic message otherwise).
pub fn llava_med_run_ok<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
) -> std::process::Output {
    let out = llava_med().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Stdout of a `llava-med` run that must succeed.
pub fn llava_med_ok<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> Vec<u8> {
    llava_med_run_ok(args).stdout
}

/// Downloaded test data (`scripts/fetch-test-data.sh`), if present.
pub fn test_data(name: &str) -> Option<PathBuf> {
    let root = std::env::var_os("LLAVA_MED_TEST_DATA")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/llava-med-test-data"))
        })?;
    let p = root.join(name);
    p.exists().then_some(p)
}

/// Test data that CI must have: missing data fails the test when `LLAVA_MED_REQUIRE_TEST_DATA=1`.
pub fn required_test_data(name: &str) -> Option<PathBuf> {
    let found = test_data(name);
    if found.is_none() {
        assert!(
            std::env::var("LLAVA_MED_REQUIRE_TEST_DATA").as_deref() != Ok("1"),
            "test data `{name}` missing: run scripts/fetch-test-data.sh"
        );
        eprintln!("skipping: test data `{name}` not found (run scripts/fetch-test-data.sh)");
    }
    found
}

/// Reference tensors of a fixture.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn open(path: &Path) -> Self {
        Self {
            bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    pub fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        (
            t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            t.shape().to_vec(),
        )
    }

    pub fn i64(&self, name: &str) -> Vec<i64> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        t.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Asserts `max |a - b| <= tol`, printing the figure either way (for the issue notes and BENCHMARKS.md).
pub fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    let d = max_abs_diff(a, b);
    eprintln!("{what}: max |Δ| = {d:.3e} (tolerance {tol:.0e})");
    assert!(d <= tol, "{what}: max |Δ| = {d} > {tol}");
}

pub fn to_vec<const D: usize>(t: burn::tensor::Tensor<D>) -> Vec<f32> {
    t.cast(burn::tensor::DType::F32)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap()
}

/// A scratch folder, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh folder under the system's temporary folder, unique to this process and `tag`.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("llava-med-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies folder `from` (recursively) to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
