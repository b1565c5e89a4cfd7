//! The token embedding table, in the float type or quantised ([`crate::quant`]).

use burn::module::{Module, Param};
use burn::tensor::{DType, Device, Int, Tensor, module::embedding};

use crate::fused::row_matmul;
use crate::quant::QuantizedMatrix;

/// `[vocab, hidden]` rows looked up by token id.
#[derive(Module, Debug)]
pub enum TokenEmbedding {
    /// In the float type.
    Float(Param<Tensor<2>>),
    /// Packed, one row per token.
    Quantized(QuantizedMatrix),
}

impl TokenEmbedding {
    /// `[batch, seq]` ids → `[batch, seq, hidden]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        match self {
            TokenEmbedding::Float(w) => embedding(w.val(), ids),
            TokenEmbedding::Quantized(q) => {
                let [b, s] = ids.dims();
                q.select_rows(ids.reshape([b * s]))
                    .reshape([b, s, q.dims()[1]])
            }
        }
    }

    /// Logits through the table as a tied output head: `[batch, seq, hidden]` → `[batch, seq, vocab]`.
    pub fn project(&self, h: Tensor<3>) -> Tensor<3> {
        match self {
            // W·hᵀ then transpose the (small) result: transposing the [vocab, hidden] table instead would
            // materialise a copy of it on every call.
            TokenEmbedding::Float(w) => {
                let [b, s, d] = h.dims();
                let (flat, table) = (h.clone().reshape([b * s, d]), w.val());
                // Decoding on a GPU: the table is already a row per output, as the one-row kernel reads.
                // Decoding on the CPU: the threaded product by weight rows.
                if row_matmul::takes_kernel(&flat, &table)
                    || row_matmul::takes_cpu_rows_kernel(&flat, &table)
                {
                    let vocab = table.dims()[0];
                    return row_matmul::row_matmul(flat, table).reshape([b, s, vocab]);
                }
                table
                    .unsqueeze::<3>()
                    .matmul(h.swap_dims(1, 2))
                    .swap_dims(1, 2)
            }
            TokenEmbedding::Quantized(q) => {
                let [b, s, d] = h.dims();
                q.matmul_t(h.reshape([b * s, d]))
                    .reshape([b, s, q.dims()[0]])
            }
        }
    }

    /// The float type of the looked-up rows.
    pub fn dtype(&self) -> DType {
        match self {
            TokenEmbedding::Float(w) => w.val().dtype(),
            TokenEmbedding::Quantized(q) => q.dtype(),
        }
    }

    /// The device the table lives on.
    pub fn device(&self) -> Device {
        match self {
            TokenEmbedding::Float(w) => w.val().device(),
            TokenEmbedding::Quantized(q) => q.device(),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;

    use super::*;
    use crate::fused::test_support::{assert_close, values};

    /// The tied head on a GPU: a decoding step's row through the one-row kernel, a prompt's rows through
    /// Burn's product, both against sums taken on the host.
    #[cfg(feature = "wgpu")]
    #[test]
    fn the_tied_head_projects_on_wgpu() {
        let gpu = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
        tied_head_projects(&gpu, |seq| seq == 1 && row_matmul::enabled());
    }

    /// The same on the CPU: a decoding step's row through the threaded product by weight rows, a
    /// prompt's through Burn's.
    #[test]
    fn the_tied_head_projects_on_the_cpu() {
        tied_head_projects(&Device::flex(), |seq| seq == 1 && row_matmul::cpu_enabled());
    }

    /// Projects 1 and 12 rows through a tied head on `device`, checking which take a kernel
    /// (`kernel(rows)`) and the values against sums taken on the host.
    fn tied_head_projects(device: &Device, kernel: impl Fn(usize) -> bool) {
        let (vocab, d) = (300, 96);
        let table: Vec<f32> = values(vocab * d).iter().map(|v| v / 50.0).collect();
        let head = TokenEmbedding::Float(Param::from_tensor(Tensor::from_data(
            TensorData::new(table.clone(), [vocab, d]),
            device,
        )));
        for seq in [1, 12] {
            let h = values(seq * d + 7)[7..].to_vec();
            let flat = Tensor::<2>::from_data(TensorData::new(h.clone(), [seq, d]), device);
            let takes = row_matmul::takes_kernel(&flat, &head_table(&head))
                || row_matmul::takes_cpu_rows_kernel(&flat, &head_table(&head));
            assert_eq!(takes, kernel(seq), "{seq} rows");
            let want: Vec<f32> = (0..seq * vocab)
                .map(|at| {
                    let (s, v) = (at / vocab, at % vocab);
                    (0..d)
                        .map(|i| f64::from(h[s * d + i]) * f64::from(table[v * d + i]))
                        .sum::<f64>() as f32
                })
                .collect();
            let want = Tensor::<3>::from_data(TensorData::new(want, [1, seq, vocab]), device);
            let got = head.project(flat.reshape([1, seq, d]));
            assert_close(&format!("tied head, {seq} rows"), got, want, 1e-5);
        }
    }

    fn head_table(head: &TokenEmbedding) -> Tensor<2> {
        match head {
            TokenEmbedding::Float(w) => w.val(),
            TokenEmbedding::Quantized(_) => unreachable!("a float table"),
        }
    }
}
