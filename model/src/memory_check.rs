//! Whether a model fits the machine's memory, checked from its config before a CPU load: a 7B checkpoint
//! in f32 needs ~29 GB, and a load past the available memory does not fail with an error but ends with the
//! system killing the process minutes in, or swapping the desktop to a standstill.

use std::path::Path;

use burn::tensor::DType;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::quant::{Quantization, footprint};

/// Environment variable capping the memory a load may plan on (bytes, or with a `GB`/`MB` suffix), below
/// what the system reports available: to leave room for other programs.
pub const LIMIT_ENV: &str = "LLAVA_MED_MEMORY_LIMIT";

/// Memory a load needs beyond its weights: activations, a KV cache of a few thousand positions, buffers
/// and the runtime (a 7B int4 `bench` peaked at 4.9 GB for 4.4 GB of weights).
pub const HEADROOM: u64 = 1_000_000_000;

/// Bytes a model of `config` needs in `dtype` with `quant`: its weights and [`HEADROOM`].
pub fn needed(config: &ModelConfig, dtype: DType, quant: Quantization) -> u64 {
    let (decoder, tower, projector) = footprint::weight_bytes(config, dtype.size(), quant);
    (decoder + tower + projector) as u64 + HEADROOM
}

/// The finest of none, int8 and int4 whose needs fit `available`, with `dtype(q)` the float type a load
/// with `q` runs in; int4 when none fits (the load's [`check`] then says what would be needed).
pub fn finest_fitting(
    config: &ModelConfig,
    available: u64,
    dtype: impl Fn(Quantization) -> DType,
) -> Quantization {
    [Quantization::None, Quantization::Int8, Quantization::Int4]
        .into_iter()
        .find(|&q| needed(config, dtype(q), q) <= available)
        .unwrap_or(Quantization::Int4)
}

/// Bytes a load may plan on: what the system reports available (within a container's limit), capped by
/// [`LIMIT_ENV`]; `None` where neither says.
pub fn available() -> Result<Option<u64>> {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let mut available = Some(system.available_memory()).filter(|&b| b > 0);
    // A container's limit less its processes' resident memory: its "free" memory also counts the page
    // cache (a checkpoint read a minute ago) as used, which the kernel hands back when asked.
    if let Some(cgroup) = system.cgroup_limits() {
        let room = cgroup.total_memory.saturating_sub(cgroup.rss);
        available = Some(available.map_or(room, |a| a.min(room)));
    }
    if let Some(limit) = std::env::var_os(LIMIT_ENV) {
        let limit = parse_bytes(&limit.to_string_lossy()).ok_or_else(|| {
            Error::Input(format!(
                "{LIMIT_ENV}={}: not a size (bytes, or a number with GB or MB)",
                limit.to_string_lossy()
            ))
        })?;
        available = Some(available.map_or(limit, |a| a.min(limit)));
    }
    Ok(available)
}

/// `12000000000`, `12GB`, `12.5 GB`, `800MB` (decimal units).
fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim().to_ascii_uppercase();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (text[..i].trim(), text[i..].trim()),
        None => (text.as_str(), ""),
    };
    let scale = match unit {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        _ => return None,
    };
    let value: f64 = number.parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some((value * scale) as u64)
}

/// Refuses to load the model in `dir` (`config`, in `dtype` with `quant`) when it needs more than
/// `available` bytes, naming the quantisations that would fit.
pub fn check(
    dir: &Path,
    config: &ModelConfig,
    dtype: DType,
    quant: Quantization,
    available: u64,
) -> Result<()> {
    let need = needed(config, dtype, quant);
    if need <= available {
        return Ok(());
    }
    let gb = |b: u64| b as f64 / 1e9;
    let smaller: Vec<String> = [Quantization::Int8, Quantization::Int4]
        .into_iter()
        .map(|q| (q, needed(config, dtype, q)))
        .filter(|&(_, n)| n < need && n <= available)
        .map(|(q, n)| format!("{q} needs about {:.1} GB", gb(n)))
        .collect();
    let advice = if smaller.is_empty() {
        "close other programs, or use a machine with more memory".to_string()
    } else {
        format!("load it quantised ({})", smaller.join(", "))
    };
    Err(Error::Memory {
        path: dir.to_path_buf(),
        message: format!(
            "loading it in {}{} needs about {:.1} GB of memory and {:.1} GB is available; {advice}",
            format!("{dtype:?}").to_lowercase(),
            match quant {
                Quantization::None => String::new(),
                q => format!(" with {q} weights"),
            },
            gb(need),
            gb(available)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_7b_model_in_f32_is_refused_where_int4_fits() {
        let config = crate::bench::shape_config("7b").unwrap();
        let dir = Path::new("/models/llava-med-7b");
        let f32_need = needed(&config, DType::F32, Quantization::None);
        assert!((28e9..32e9).contains(&(f32_need as f64)), "{f32_need}");
        let err = check(dir, &config, DType::F32, Quantization::None, 16_000_000_000).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("/models/llava-med-7b: loading it in f32"),
            "{text}"
        );
        assert!(
            text.contains("int8 needs about") && text.contains("int4 needs about"),
            "{text}"
        );
        // 6 GB: only int4 fits.
        let text = check(dir, &config, DType::F32, Quantization::None, 6_000_000_000)
            .unwrap_err()
            .to_string();
        assert!(
            !text.contains("int8") && text.contains("int4 needs about 5."),
            "{text}"
        );
        check(dir, &config, DType::F32, Quantization::Int4, 6_000_000_000).unwrap();
        // Nothing fits.
        let text = check(dir, &config, DType::F32, Quantization::Int4, 1_000_000_000)
            .unwrap_err()
            .to_string();
        assert!(text.contains("close other programs"), "{text}");
    }

    #[test]
    fn the_finest_quantisation_that_fits_is_chosen() {
        let config = crate::bench::shape_config("7b").unwrap();
        let f32 = |_| DType::F32;
        assert_eq!(
            finest_fitting(&config, 64_000_000_000, f32),
            Quantization::None
        );
        assert_eq!(
            finest_fitting(&config, 16_000_000_000, f32),
            Quantization::Int8
        );
        assert_eq!(
            finest_fitting(&config, 8_000_000_000, f32),
            Quantization::Int4
        );
        assert_eq!(finest_fitting(&config, 1_000_000, f32), Quantization::Int4);
        // In f16 the float model fits where its f32 form would not.
        let f16 = |q| {
            if q == Quantization::None {
                DType::F16
            } else {
                DType::F32
            }
        };
        assert_eq!(
            finest_fitting(&config, 20_000_000_000, f16),
            Quantization::None
        );
    }

    #[test]
    fn sizes_parse_in_decimal_units() {
        assert_eq!(parse_bytes("12000"), Some(12_000));
        assert_eq!(parse_bytes("12GB"), Some(12_000_000_000));
        assert_eq!(parse_bytes(" 1.5 gb "), Some(1_500_000_000));
        assert_eq!(parse_bytes("800MB"), Some(800_000_000));
        for bad in ["", "GB", "12 GiB", "-1GB", "lots"] {
            assert_eq!(parse_bytes(bad), None, "{bad}");
        }
    }
}
