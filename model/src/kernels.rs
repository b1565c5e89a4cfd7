//! Where this crate's own kernels run. They are Burn backend extensions (the packed quantised products in
//! [`crate::quant`], the fused element-wise kernels in [`crate::fused`]) with an implementation for the CPU
//! backend (Flex) and one for every CubeCL runtime (wgpu, Vulkan, CUDA); any other case takes the generic
//! tensor-op path written beside each extension.

#[cfg(any(feature = "wgpu", feature = "vulkan", feature = "cuda"))]
use burn::backend::DispatchDevice;
use burn::tensor::{DType, Device};

/// Whether tensors of `dtype` on `device` have a kernel here: f32 on the CPU backend, any float type on
/// a CubeCL device; never on an autodiff device (the kernels have no backward pass).
pub fn applies(device: &Device, dtype: DType) -> bool {
    if device.is_autodiff() {
        return false;
    }
    if on_cpu(device) {
        return dtype == DType::F32;
    }
    if on_cube(device) {
        return matches!(dtype, DType::F32 | DType::F16 | DType::BF16);
    }
    false
}

/// Whether `device` is the CPU backend (Flex) and not an autodiff device.
pub fn on_cpu(device: &Device) -> bool {
    #[cfg(feature = "cpu")]
    {
        !device.is_autodiff() && *device == Device::flex()
    }
    #[cfg(not(feature = "cpu"))]
    {
        let _ = device;
        false
    }
}

/// The meaning of this crate's on/off environment switches: on unless set to `0`, `off` or `false`.
pub fn switch_on(value: Option<&str>) -> bool {
    !matches!(
        value.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("0" | "off" | "false")
    )
}

/// Whether `device` is a CubeCL runtime (wgpu, Vulkan, CUDA) and not an autodiff device: where a kernel
/// of this crate replaces one of Burn's own GPU ops rather than a CPU one.
pub fn on_cube(device: &Device) -> bool {
    if device.is_autodiff() {
        return false;
    }
    #[cfg(any(feature = "wgpu", feature = "vulkan", feature = "cuda"))]
    if matches!(device.as_dispatch(), DispatchDevice::Cube(_)) {
        return true;
    }
    false
}

/// Whether this CPU has AVX2 (checked once). The build targets baseline x86-64 (SSE2, 4 lanes), so host
/// loops (the CPU kernels, the quantiser) are also compiled for AVX2 and chosen at run time.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| std::arch::is_x86_feature_detected!("avx2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU has AVX2 and FMA (checked once): the fused multiply-add builds of the CPU kernels.
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static FMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *FMA.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU has AVX-512F (checked once).
pub fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX512.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU has AMX tiles with bf16 products that this process may use (checked once): the CPU
/// reports AMX-TILE and AMX-BF16, has AVX-512F (the packing code's), and Linux granted the tile data
/// state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, which fails where the kernel or a VM withholds it).
/// `LLAVA_MED_CPU_AMX=0` turns it off (for comparison with the AVX-512 path).
pub fn has_amx_bf16() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    {
        static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AMX.get_or_init(|| {
            let wanted = switch_on(std::env::var("LLAVA_MED_CPU_AMX").ok().as_deref());
            // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
            let leaf = std::arch::x86_64::__cpuid_count(7, 0);
            let cpu = leaf.edx & (1 << 22) != 0 && leaf.edx & (1 << 24) != 0;
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments; it only changes this process's
            // permitted extended states.
            let granted = || unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                ) == 0
            };
            wanted && cpu && has_avx512f() && granted()
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
    false
}

/// The instruction sets this crate's CPU kernels found and use here (for reports: `bench`'s JSON).
pub fn cpu_paths() -> Vec<&'static str> {
    [
        (has_avx2_fma(), "avx2+fma"),
        (has_avx512f(), "avx512f"),
        (has_amx_bf16(), "amx-bf16"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect()
}

/// Launch helpers for the CubeCL kernels.
#[cfg(any(feature = "wgpu", feature = "vulkan", feature = "cuda"))]
pub(crate) mod device {
    use burn::tensor::Shape;
    use burn_cubecl::cubecl::calculate_cube_count_elemwise;
    use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
    use burn_cubecl::ops::numeric::empty_device_dtype;
    use burn_cubecl::tensor::CubeTensor;

    /// Most cubes along one dispatch dimension (WebGPU's guaranteed minimum is 65 535).
    pub const MAX_CUBES_X: usize = 32_768;

    /// A new tensor of `shape` on `like`'s device, in its type.
    pub fn empty_like(like: &CubeTensor, shape: Shape) -> CubeTensor {
        empty_device_dtype(like.client.clone(), like.device.clone(), shape, like.dtype)
    }

    /// Cubes and their size for one unit per value of `units` values on `on`'s device.
    pub fn per_value(on: &CubeTensor, units: usize) -> (CubeCount, CubeDim) {
        let cube_dim = CubeDim::new(&on.client, units);
        (
            calculate_cube_count_elemwise(&on.client, units, cube_dim),
            cube_dim,
        )
    }

    /// `n` cubes, numbered `CUBE_POS_Y · CUBE_COUNT_X + CUBE_POS_X` (the last row of them may run past `n`).
    pub fn cubes(n: usize) -> CubeCount {
        let x = n.clamp(1, MAX_CUBES_X);
        CubeCount::Static(x as u32, n.div_ceil(x).max(1) as u32, 1)
    }
}

#[cfg(feature = "cpu")]
pub(crate) mod team;

/// Helpers for the CPU backend's kernels.
#[cfg(feature = "cpu")]
pub(crate) mod host {
    use std::borrow::Cow;

    use burn::backend::Flex;
    use burn::backend::tensor::FloatTensor;

    /// An output buffer shared by parallel tasks, each of which writes only its own part of it (every use
    /// says why the parts are disjoint).
    pub struct SharedOut(pub *mut f32);

    // SAFETY: the tasks holding it write disjoint values (see each use), and the buffer outlives them.
    unsafe impl Sync for SharedOut {}

    impl SharedOut {
        /// The address of value `i` of the buffer.
        pub fn at(&self, i: usize) -> *mut f32 {
            self.0.wrapping_add(i)
        }
    }

    /// A zeroed scratch buffer of floats whose first value starts a 64-byte cache line, so that 16-lane
    /// loads at multiples of 16 values from it never straddle two lines (a load that does costs two: ~10 %
    /// of the AVX-512 product's speed on the Intel CI machine when its weight panels sat wherever `Vec`
    /// put them).
    pub struct AlignedScratch {
        store: Vec<f32>,
        start: usize,
        len: usize,
    }

    impl AlignedScratch {
        /// `len` zeros, aligned.
        pub fn zeroed(len: usize) -> Self {
            // A `Vec<f32>` starts on at least a 4-byte boundary, so 15 extra values always reach a line.
            let store = vec![0.0f32; len + 15];
            let start = store.as_ptr().align_offset(64);
            Self { store, start, len }
        }

        /// The address of the first aligned value.
        pub fn as_ptr(&self) -> *const f32 {
            self.store[self.start..].as_ptr()
        }

        /// The aligned values.
        pub fn as_mut_slice(&mut self) -> &mut [f32] {
            &mut self.store[self.start..self.start + self.len]
        }
    }

    /// A tensor's values in row-major order, borrowed when they already are.
    pub fn values<E: burn::tensor::Element + bytemuck::Pod>(t: &FloatTensor<Flex>) -> Cow<'_, [E]> {
        match t.layout().contiguous_offsets() {
            Some((start, end)) => Cow::Borrowed(&t.storage::<E>()[start..end]),
            None => Cow::Owned(t.to_contiguous().storage::<E>().to_vec()),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::AlignedScratch;

        #[test]
        fn aligned_scratch_starts_a_cache_line_and_holds_len_zeros() {
            // Several allocations, so that some land off a line and the offset is exercised.
            let mut held = Vec::new();
            for len in [0, 1, 15, 16, 17, 6144, 100_003] {
                let mut s = AlignedScratch::zeroed(len);
                let v = s.as_mut_slice();
                assert_eq!(v.len(), len);
                assert_eq!(v.as_ptr() as usize % 64, 0, "length {len}");
                assert!(v.iter().all(|&x| x == 0.0));
                v.fill(1.0);
                held.push(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::switch_on;

    #[test]
    fn switches_are_on_unless_switched_off() {
        for on in [None, Some("1"), Some("on"), Some("")] {
            assert!(switch_on(on), "{on:?}");
        }
        for off in ["0", "off", "FALSE", " 0 "] {
            assert!(!switch_on(Some(off)), "{off:?}");
        }
    }
}
