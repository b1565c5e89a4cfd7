//! A [`Packed`] matrix on the device. The CPU backend and the CubeCL runtimes have kernels for it
//! ([`extension`]); elsewhere it is unpacked with generic tensor ops (shifts, masks, a multiply-add).
//! Products longer than a few rows dequantise a slab of rows at a time (except on the CPU, whose kernels
//! work a cache-sized block at a time), so the float copy of a large
//! matrix never exists whole.

use burn::module::{Module, Param, ParamId};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use super::extension;
use super::pack::{GROUP, Packed};
use crate::fused::activation::silu_mul;
use crate::fused::rms_norm::rms_norm;
use crate::kernels;

/// Most values a matrix product dequantises at once (64 MiB in f32).
pub const SLAB_VALUES: usize = 1 << 24;

/// Codes, group parameters and super-block maxima of some rows of a [`QuantizedMatrix`].
type Parts = (Tensor<3, Int>, Tensor<2, Int>, Tensor<3>);

/// A `[rows, cols]` matrix stored in the packed format (see [`super::pack`]).
#[derive(Module, Debug)]
pub struct QuantizedMatrix {
    /// `[rows, groups, bits]`: a group's 32 codes take `bits` words, so the shape tells the value count.
    codes: Param<Tensor<3, Int>>,
    group_params: Param<Tensor<2, Int>>,
    supers: Param<Tensor<3>>,
    rows: usize,
    cols: usize,
    bits: usize,
    groups_per_super: usize,
}

impl QuantizedMatrix {
    /// Uploads a packed matrix; the super-block maxima are stored in `dtype`, the float type the
    /// dequantised values come back in.
    pub fn upload(p: Packed, device: &Device, dtype: DType) -> Self {
        let groups = p.cols / GROUP;
        let words = |v: Vec<i32>, shape: Vec<usize>| TensorData::new(v, shape);
        let supers = TensorData::new(p.supers, [p.rows, groups / p.groups_per_super, 2]);
        Self {
            codes: Param::initialized(
                ParamId::new(),
                Tensor::<3, Int>::from_data(
                    words(p.codes, vec![p.rows, groups, p.bits]),
                    (device, DType::I32),
                ),
            ),
            group_params: Param::initialized(
                ParamId::new(),
                Tensor::<2, Int>::from_data(
                    words(p.group_params, vec![p.rows, groups.div_ceil(2)]),
                    (device, DType::I32),
                ),
            ),
            supers: Param::from_tensor(Tensor::<3>::from_data(supers, device).cast(dtype)),
            rows: p.rows,
            cols: p.cols,
            bits: p.bits,
            groups_per_super: p.groups_per_super,
        }
    }

    /// `[rows, cols]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Bits per stored code.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// The float type values are dequantised to.
    pub fn dtype(&self) -> DType {
        self.supers.val().dtype()
    }

    /// The device the matrix lives on.
    pub fn device(&self) -> Device {
        self.codes.val().device()
    }

    /// The whole matrix in its float type, `[rows, cols]`.
    pub fn dequantize(&self) -> Tensor<2> {
        self.unpack(self.codes.val(), self.group_params.val(), self.supers.val())
    }

    /// The rows `ids` (`[n]`) in the float type, `[n, cols]`: an embedding lookup.
    pub fn select_rows(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        self.unpack(
            self.codes.val().select(0, ids.clone()),
            self.group_params.val().select(0, ids.clone()),
            self.supers.val().select(0, ids),
        )
    }

    /// `x` `[m, cols]` times the transpose of the matrix: `[m, rows]`, through the backend's packed-matrix
    /// kernel where it has one ([`extension`]), else a slab of rows at a time unpacked with tensor ops.
    pub fn matmul_t(&self, x: Tensor<2>) -> Tensor<2> {
        if x.dtype() == self.dtype() && kernels::applies(&x.device(), x.dtype()) {
            // The fused product never materialises the matrix, nor do the CPU kernels for longer inputs
            // (a block at a time): one call for all of it, which prepares the input once (the CPU
            // kernels quantise it; a 7B layer's down projection in slabs did that four times).
            #[cfg(feature = "cpu")]
            let whole = x.device() == Device::flex();
            #[cfg(not(feature = "cpu"))]
            let whole = false;
            let max_values = if whole || x.dims()[0] <= extension::FUSED_MAX_ROWS {
                usize::MAX
            } else {
                SLAB_VALUES
            };
            let outs: Vec<Tensor<2>> = self
                .row_ranges(max_values)
                .map(|(codes, group_params, supers)| {
                    extension::packed_matmul(
                        x.clone(),
                        codes,
                        group_params,
                        supers,
                        self.bits,
                        self.groups_per_super,
                    )
                })
                .collect();
            return side_by_side(outs);
        }
        let outs: Vec<Tensor<2>> = self
            .slabs(SLAB_VALUES)
            .map(|w| x.clone().matmul(w.transpose()))
            .collect();
        side_by_side(outs)
    }

    /// Whether [`Self::norm_matmul_t`] and [`Self::matmul_t_add`] of `x` take their steps in the packed
    /// product's one launch: a CubeCL device, at most [`extension::FUSED_MAX_ROWS`] rows (decoding),
    /// `x` in the matrix's type.
    pub fn fuses(&self, x: &Tensor<2>) -> bool {
        let device = x.device();
        x.dims()[0] <= extension::FUSED_MAX_ROWS
            && x.dtype() == self.dtype()
            && kernels::on_cube(&device)
            && kernels::applies(&device, x.dtype())
    }

    /// [`Self::matmul_t`] of `x`'s RMSNorm with `gamma` `[cols]` (`eps`): `[m, rows]`; with `silu`, the
    /// matrix's rows being SwiGLU's gate rows then its up rows, `silu(gate) · up`: `[m, rows / 2]`.
    pub fn norm_matmul_t(&self, x: Tensor<2>, gamma: Tensor<1>, eps: f64, silu: bool) -> Tensor<2> {
        if !self.fuses(&x) {
            let y = self.matmul_t(rms_norm(x, gamma, eps));
            return if silu { silu_mul(y) } else { y };
        }
        extension::packed_norm_matmul(
            x,
            gamma,
            self.codes.val(),
            self.group_params.val(),
            self.supers.val(),
            self.bits,
            self.groups_per_super,
            eps as f32,
            silu,
        )
    }

    /// `residual` `[m, rows]` plus [`Self::matmul_t`] of `x` (the residual stream after a sublayer's
    /// output projection).
    pub fn matmul_t_add(&self, x: Tensor<2>, residual: Tensor<2>) -> Tensor<2> {
        if !self.fuses(&x) {
            return residual + self.matmul_t(x);
        }
        extension::packed_matmul_add(
            x,
            self.codes.val(),
            self.group_params.val(),
            self.supers.val(),
            residual,
            self.bits,
            self.groups_per_super,
        )
    }

    /// Consecutive row ranges of at most `max_values` values (at least one row), each dequantised,
    /// `[rows in slab, cols]`.
    pub fn slabs(&self, max_values: usize) -> impl Iterator<Item = Tensor<2>> + '_ {
        self.row_ranges(max_values)
            .map(|(codes, group_params, supers)| self.unpack(codes, group_params, supers))
    }

    /// The stored parts of consecutive row ranges of at most `max_values` values (at least one row).
    fn row_ranges(&self, max_values: usize) -> impl Iterator<Item = Parts> + '_ {
        let step = (max_values / self.cols).max(1);
        (0..self.rows).step_by(step).map(move |r0| {
            let n = step.min(self.rows - r0);
            (
                self.codes.val().narrow(0, r0, n),
                self.group_params.val().narrow(0, r0, n),
                self.supers.val().narrow(0, r0, n),
            )
        })
    }

    fn unpack(
        &self,
        codes: Tensor<3, Int>,
        group_params: Tensor<2, Int>,
        supers: Tensor<3>,
    ) -> Tensor<2> {
        let dtype = supers.dtype();
        if kernels::applies(&supers.device(), dtype) {
            return extension::packed_dequantize(
                codes,
                group_params,
                supers,
                self.bits,
                self.groups_per_super,
            );
        }
        let rows = codes.dims()[0];
        let groups = self.cols / GROUP;
        let supers_per_row = groups / self.groups_per_super;
        let q = fields(codes.reshape([rows, groups * self.bits]), self.bits)
            .reshape([rows, groups, GROUP]);
        // Two groups per word, each a (scale code, minimum code + 128) byte pair.
        let params = fields(group_params, 8)
            .reshape([rows, groups.div_ceil(2) * 2, 2])
            .narrow(1, 0, groups);
        let per_super = |t: Tensor<3>| t.reshape([rows, supers_per_row, self.groups_per_super]);
        let supers = supers.cast(DType::F32);
        let scale =
            per_super(params.clone().narrow(2, 0, 1)) * (supers.clone().narrow(2, 0, 1) / 255.0);
        let min = (per_super(params.narrow(2, 1, 1)) - 128.0) * (supers.narrow(2, 1, 1) / 127.0);
        let scale = scale.reshape([rows, groups, 1]);
        let min = min.reshape([rows, groups, 1]);
        (q * scale + min).reshape([rows, self.cols]).cast(dtype)
    }
}

/// The `bits`-wide fields of `[rows, words]` 32-bit words, lowest first, as f32 `[rows, words, 32 / bits]`:
/// one broadcast shift and one mask (two kernels on a GPU backend rather than two per field).
fn fields(words: Tensor<2, Int>, bits: usize) -> Tensor<3> {
    let per_word = 32 / bits;
    let shifts: Vec<i32> = (0..per_word).map(|j| (j * bits) as i32).collect();
    let shifts = Tensor::<1, Int>::from_data(
        TensorData::new(shifts, [per_word]),
        (&words.device(), DType::I32),
    )
    .reshape([1, 1, per_word]);
    words
        .unsqueeze_dim::<3>(2)
        .bitwise_right_shift(shifts)
        .bitwise_and_scalar((1i64 << bits) - 1)
        .float()
        .cast(DType::F32)
}

/// Products of consecutive row ranges side by side, `[m, Σ rows]`: one part is returned as it is, since
/// concatenating even one part copies it (a launch per product on a GPU, 129 per `7b` token decoded).
fn side_by_side(mut parts: Vec<Tensor<2>>) -> Tensor<2> {
    if parts.len() == 1
        && let Some(part) = parts.pop()
    {
        return part;
    }
    Tensor::cat(parts, 1)
}

#[cfg(test)]
mod tests {
    use super::super::pack::quantize;
    use super::*;
    use burn::tensor::Distribution;

    fn host(t: Tensor<2>) -> Vec<f32> {
        t.cast(DType::F32)
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap()
    }

    /// Largest difference, relative to the largest value (a fused multiply-add may round differently).
    fn close(a: &[f32], b: &[f32]) -> bool {
        let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-6 * scale)
    }

    #[test]
    fn device_unpacking_matches_the_host_reference() {
        let device = Device::default();
        let (rows, cols) = (40, 96);
        let w = Tensor::<2>::random([rows, cols], Distribution::Normal(0.0, 0.02), &device);
        let values = host(w);
        for bits in [4, 8] {
            let packed = quantize(&values, rows, cols, bits, DType::F32);
            let want = packed.dequantize();
            let m = QuantizedMatrix::upload(packed, &device, DType::F32);
            assert!(close(&host(m.dequantize()), &want), "{bits} bits");
            let ids = Tensor::<1, Int>::from_data([5, 0, 39], &device);
            let picked = host(m.select_rows(ids));
            for (i, r) in [5, 0, 39].into_iter().enumerate() {
                assert!(close(
                    &picked[i * cols..(i + 1) * cols],
                    &want[r * cols..(r + 1) * cols]
                ));
            }
            assert_eq!(m.slabs(cols * 7).count(), 6);
            let slabs: Vec<f32> = m.slabs(cols * 7).flat_map(host).collect();
            assert!(close(&slabs, &want));
        }
    }
}
