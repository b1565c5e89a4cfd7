//! The fused activations as CubeCL kernels ([`super::extension`]), for every CubeCL runtime (wgpu/Vulkan,
//! CUDA): one launch and one pass instead of the three or four of the tensor ops (a slice copy, the
//! sigmoid, the products), computed in f32 whatever the tensors' type.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::tensor::Shape;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;

use super::extension::ActivationOps;

/// `out[r, i] = silu(h[r, i]) · h[r, inner + i]`, one unit per output value.
#[cube(launch_unchecked)]
fn silu_mul_kernel<F: Float>(h: &Tensor<F>, out: &mut Tensor<F>, #[define(F)] _dtype: ElemType) {
    let id = ABSOLUTE_POS;
    if id >= out.len() {
        terminate!();
    }
    let inner = out.shape(out.rank() - 1);
    let (row, col) = (id / inner, id % inner);
    let g = f32::cast_from(h[row * 2 * inner + col]);
    let u = f32::cast_from(h[row * 2 * inner + inner + col]);
    out[id] = F::cast_from(g / (1.0 + (-g).exp()) * u);
}

/// `out[i] = x[i] · sigmoid(1.702 · x[i])`, one unit per value.
#[cube(launch_unchecked)]
fn quick_gelu_kernel<F: Float>(x: &Tensor<F>, out: &mut Tensor<F>, #[define(F)] _dtype: ElemType) {
    let id = ABSOLUTE_POS;
    if id >= out.len() {
        terminate!();
    }
    let v = f32::cast_from(x[id]);
    let a = -1.702f32;
    out[id] = F::cast_from(v / (1.0 + (v * a).exp()));
}

impl ActivationOps for CubeBackend {
    fn silu_mul(gate_up: FloatTensor<Self>) -> FloatTensor<Self> {
        let h = into_contiguous(gate_up);
        let mut dims = h.meta.shape().to_vec();
        if let Some(last) = dims.last_mut() {
            *last /= 2;
        }
        let out = empty_device_dtype(
            h.client.clone(),
            h.device.clone(),
            Shape::from(dims.clone()),
            h.dtype,
        );
        let units: usize = dims.iter().product();
        let cube_dim = CubeDim::new(&h.client, units);
        let count = calculate_cube_count_elemwise(&h.client, units, cube_dim);
        let dtype = h.dtype;
        // SAFETY: `h` is contiguous with twice the output's last dimension, so every index read is inside
        // it; units past the output's length stop first, and each writes only its own value.
        unsafe {
            silu_mul_kernel::launch_unchecked(
                &out.client,
                count,
                cube_dim,
                h.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                dtype_to_storage_type(dtype),
            );
        }
        out
    }

    fn quick_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let x = into_contiguous(x);
        let dims = x.meta.shape().to_vec();
        let out = empty_device_dtype(
            x.client.clone(),
            x.device.clone(),
            Shape::from(dims.clone()),
            x.dtype,
        );
        let units: usize = dims.iter().product();
        let cube_dim = CubeDim::new(&x.client, units);
        let count = calculate_cube_count_elemwise(&x.client, units, cube_dim);
        let dtype = x.dtype;
        // SAFETY: input and output are contiguous with the same shape; units past it stop first.
        unsafe {
            quick_gelu_kernel::launch_unchecked(
                &out.client,
                count,
                cube_dim,
                x.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                dtype_to_storage_type(dtype),
            );
        }
        out
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::tensor::{DType, Device, DeviceKind};

    #[test]
    fn kernels_match_the_tensor_ops_on_wgpu() {
        let gpu = Device::wgpu(DeviceKind::DefaultDevice);
        super::super::tests::check_against_reference(&gpu, DType::F32, 1e-5);
        super::super::tests::check_against_reference(&gpu, DType::F16, 4e-3);
    }
}
