//! The rotary position embedding of some heads of the fused q/k/v projection, in one pass: slicing the
//! heads out, laying them out as `[batch, heads, seq, head_dim]` and rotating them were a copy and six
//! element-wise ops per call.

use burn::tensor::Tensor;

use super::extension;
use crate::kernels;

/// The `heads` heads starting at column `start` of `qkv` `[batch, seq, width]`, at positions `offset..`,
/// rotated with the tables `cos`, `sin` `[positions, head_dim]` ("rotate half": dimension i pairs with
/// i + head_dim / 2): `[batch, heads, seq, head_dim]`.
pub fn rope_heads(
    qkv: Tensor<3>,
    cos: Tensor<2>,
    sin: Tensor<2>,
    start: usize,
    heads: usize,
    offset: usize,
) -> Tensor<4> {
    let ([_, seq, width], [positions, d]) = (qkv.dims(), cos.dims());
    // Out-of-range reads on a GPU are undefined, so the bounds are checked here for every path.
    assert!(
        start + heads * d <= width && offset + seq <= positions,
        "rope: heads {start}..+{heads}×{d} of width {width}, positions {offset}..+{seq} of {positions}"
    );
    let dtype = qkv.dtype();
    if kernels::applies(&qkv.device(), dtype) && cos.dtype() == dtype && sin.dtype() == dtype {
        return extension::rope_heads(qkv, cos, sin, start, heads, offset);
    }
    reference(qkv, cos, sin, start, heads, offset)
}

/// [`rope_heads`] as generic tensor ops.
fn reference(
    qkv: Tensor<3>,
    cos: Tensor<2>,
    sin: Tensor<2>,
    start: usize,
    heads: usize,
    offset: usize,
) -> Tensor<4> {
    let [b, seq, _] = qkv.dims();
    let d = cos.dims()[1];
    let x = qkv
        .narrow(2, start, heads * d)
        .reshape([b, seq, heads, d])
        .swap_dims(1, 2);
    let cos = cos.narrow(0, offset, seq).reshape([1, 1, seq, d]);
    let sin = sin.narrow(0, offset, seq).reshape([1, 1, seq, d]);
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos + rotated * sin
}

#[cfg(test)]
pub(crate) mod tests {
    use burn::tensor::{DType, Device, Tensor, TensorData};

    use super::super::test_support::{assert_close, values};
    use super::*;

    /// The kernel against the tensor ops: q heads at column 0 and k heads further in, one position and a
    /// prompt's worth, at offsets 0 and 9.
    pub fn check_against_reference(device: &Device, dtype: DType, tol: f32) {
        let (d, positions) = (8, 40);
        let table = |f: fn(f32) -> f32| {
            let v: Vec<f32> = (0..positions * d)
                .map(|i| f((i / d) as f32 * 0.3 + (i % d) as f32 * 0.01))
                .collect();
            Tensor::<2>::from_data(TensorData::new(v, [positions, d]), device).cast(dtype)
        };
        let (cos, sin) = (table(f32::cos), table(f32::sin));
        // 4 q heads, 2 k heads, 2 v heads.
        let width = 8 * d;
        for (b, seq, offset) in [(1, 1, 9), (2, 5, 0), (1, 17, 9)] {
            let qkv = Tensor::<3>::from_data(
                TensorData::new(values(b * seq * width), [b, seq, width]),
                device,
            )
            .cast(dtype);
            for (start, heads) in [(0, 4), (4 * d, 2)] {
                assert_close(
                    &format!("rope {b}×{seq} at {offset}, heads {start}.., {dtype:?}"),
                    rope_heads(qkv.clone(), cos.clone(), sin.clone(), start, heads, offset),
                    reference(qkv.clone(), cos.clone(), sin.clone(), start, heads, offset),
                    tol,
                );
            }
        }
    }

    #[cfg(feature = "cpu")]
    #[test]
    fn the_cpu_kernel_matches_the_tensor_ops() {
        check_against_reference(&Device::flex(), DType::F32, 1e-6);
    }
}
