//! Choosing the compute device and float type, once, at the edge (CLI flag or app setting). Nothing below
//! this module knows which backend runs.

use std::fmt;
use std::str::FromStr;

use burn::tensor::{DType, Device};

use crate::error::{Error, Result};
use crate::quant::Quantization;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA, else a GPU through wgpu, else the CPU.
    Auto,
    /// Burn's pure-Rust `flex` CPU backend.
    Cpu,
    /// wgpu (WGSL), whatever adapter it picks (a GPU, or Mesa lavapipe on the CPU).
    Wgpu,
    /// wgpu pinned to Vulkan (SPIR-V).
    Vulkan,
    /// CUDA device 0.
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "vulkan" => Ok(Self::Vulkan),
            "cuda" => Ok(Self::Cuda),
            other => Err(Error::Device(format!(
                "unknown device `{other}` (auto, cpu, wgpu, vulkan, cuda)"
            ))),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Vulkan => "vulkan",
            Self::Cuda => "cuda",
        })
    }
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(Error::Device(format!(
            "unknown dtype `{other}` (f32, f16, bf16)"
        ))),
    }
}

/// A ready device with its float type.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    /// The Burn device.
    pub device: Device,
    /// Float type for weights and activations.
    pub dtype: DType,
    /// The backend that was chosen (never `Auto`).
    pub kind: DeviceChoice,
}

impl SelectedDevice {
    /// This device for a model quantised with `quant`, and a note for the user when its float type had to
    /// change: on the CPU the packed-weight kernels compute in f32 only, and the generic path in bf16 or
    /// f16 is two orders of magnitude slower (`base` int4 in bf16: 1.6 tokens/s, in f32: 147). The codes
    /// take the same memory either way; only the output head, norms and activations are wider.
    pub fn for_quantization(mut self, quant: Quantization) -> (Self, Option<String>) {
        if self.kind != DeviceChoice::Cpu || quant == Quantization::None || self.dtype == DType::F32
        {
            return (self, None);
        }
        let asked = format!("{:?}", self.dtype).to_lowercase();
        self.dtype = DType::F32;
        let note = format!(
            "--quant {quant} on the CPU computes in f32 (its kernels have no {asked} form, and {asked} \
             decodes ~90× slower); using f32"
        );
        (self, Some(note))
    }
}

/// Resolves `choice` (and an optional dtype override) to a working device. Float types: f32 on the CPU,
/// bf16 on CUDA, f16 on wgpu (WGSL has no bf16).
pub fn select(choice: DeviceChoice, dtype: Option<DType>) -> Result<SelectedDevice> {
    let kind = match choice {
        DeviceChoice::Auto => auto(),
        other => other,
    };
    let device = make(kind)?;
    let default = match kind {
        DeviceChoice::Cuda => DType::BF16,
        DeviceChoice::Wgpu | DeviceChoice::Vulkan => DType::F16,
        _ => DType::F32,
    };
    let dtype = dtype.unwrap_or(default);
    if dtype == DType::BF16 && matches!(kind, DeviceChoice::Wgpu | DeviceChoice::Vulkan) {
        return Err(Error::Device(
            "bf16 is not available on wgpu (WGSL); use f16 or f32".into(),
        ));
    }
    Ok(SelectedDevice {
        device,
        dtype,
        kind,
    })
}

fn make(kind: DeviceChoice) -> Result<Device> {
    let missing = |feature: &str| {
        Err(Error::Device(format!(
            "this build has no `{feature}` backend; rebuild with `--features {feature}` (see README)"
        )))
    };
    match kind {
        DeviceChoice::Cpu => {
            #[cfg(feature = "cpu")]
            return Ok(Device::flex());
            #[cfg(not(feature = "cpu"))]
            return missing("cpu");
        }
        DeviceChoice::Wgpu => {
            #[cfg(feature = "wgpu")]
            return Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice));
            #[cfg(not(feature = "wgpu"))]
            return missing("wgpu");
        }
        DeviceChoice::Vulkan => {
            #[cfg(feature = "vulkan")]
            return Ok(Device::vulkan(burn::tensor::DeviceKind::DefaultDevice));
            #[cfg(not(feature = "vulkan"))]
            return missing("vulkan");
        }
        DeviceChoice::Cuda => {
            #[cfg(feature = "cuda")]
            return Ok(Device::cuda(0));
            #[cfg(not(feature = "cuda"))]
            return missing("cuda");
        }
        DeviceChoice::Auto => unreachable!("resolved by auto()"),
    }
}

fn auto() -> DeviceChoice {
    #[cfg(feature = "cuda")]
    if nvidia_driver_present() {
        return DeviceChoice::Cuda;
    }
    #[cfg(feature = "wgpu")]
    if gpu_adapter().is_some() {
        return DeviceChoice::Wgpu;
    }
    DeviceChoice::Cpu
}

/// Whether the NVIDIA driver is loaded (probing CUDA itself aborts noisily when it is not).
#[cfg(feature = "cuda")]
fn nvidia_driver_present() -> bool {
    if cfg!(target_os = "linux") {
        std::path::Path::new("/proc/driver/nvidia/version").exists()
    } else {
        true
    }
}

/// A real GPU among the Vulkan/Metal/DX12 adapters: a software adapter (lavapipe, llvmpipe) is slower than
/// the CPU backend, so `auto` skips it.
#[cfg(feature = "wgpu")]
pub fn gpu_adapter() -> Option<String> {
    // No GPU device node on Linux: nothing to find, and listing would only wake the software drivers
    // (which print complaints about the missing display on headless machines).
    if cfg!(target_os = "linux") && !linux_gpu_nodes_present() {
        return None;
    }
    let backends = wgpu::Backends::PRIMARY;
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapters = futures_lite::future::block_on(instance.enumerate_adapters(backends));
    adapters
        .iter()
        .map(wgpu::Adapter::get_info)
        .find(|i| {
            matches!(
                i.device_type,
                wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu
            )
        })
        .map(|i| format!("{} ({:?})", i.name, i.backend))
}

/// Whether Linux exposes a GPU: a DRM render node or an NVIDIA device.
#[cfg(feature = "wgpu")]
fn linux_gpu_nodes_present() -> bool {
    let render_node = std::fs::read_dir("/dev/dri")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("renderD"))
        })
        .unwrap_or(false);
    render_node || std::path::Path::new("/dev/nvidia0").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "cpu")]
    #[test]
    fn quantised_cpu_models_compute_in_f32() {
        let cpu = |dtype| select(DeviceChoice::Cpu, Some(dtype)).unwrap();
        let (d, note) = cpu(DType::BF16).for_quantization(Quantization::Int4);
        assert_eq!(d.dtype, DType::F32);
        assert!(note.unwrap().contains("bf16"));
        // Already f32, or not quantised: unchanged and nothing to say.
        let (d, note) = cpu(DType::F32).for_quantization(Quantization::Int8);
        assert_eq!((d.dtype, note), (DType::F32, None));
        let (d, note) = cpu(DType::F16).for_quantization(Quantization::None);
        assert_eq!((d.dtype, note), (DType::F16, None));
    }
}
