//! Packed-weight matrix–vector benchmark on the CPU: one decoding step's products through one decoder layer
//! of LLaVA-Med v1.5 7B's Mistral (fused q/k/v 4096→6144, o 4096→4096, fused gate/up 4096→28672, down
//! 14336→4096), with weights quantised to 8 and 4 bits and in f32, `--runs N` times (default 10) after one
//! warm-up. f32 runs twice: through the float `Linear` layer (`f32`: this crate's threaded few-row products
//! on the CPU, `fused/cpu/`) and through Burn's product alone (`f32-burn`: gemm). Prints one JSON line per
//! format: milliseconds per layer (median, min, max), weights per second and the bytes of weights read per
//! second, which against the machine's memory bandwidth says whether the kernel is bound by arithmetic or by
//! memory; and the quantiser's time per weight (what loading a model with `--quant` costs).
//!
//! ```text
//! cargo run --release -p llava-med --example packed_gemv -- [--runs N] [--rows M] [--layers L]
//! ```
//!
//! `--rows` is the number of input rows (1 while decoding); `--layers` how many distinct layers' weights to
//! cycle through (default 2, ~250 MB at 4 bits: more than most caches, so weights come from memory as in a
//! whole model; the Intel CI machine's L3 is 480 MiB, `--layers 8` exceeds it).

use std::time::Instant;

use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};
use llava_med::linear::Linear;
use llava_med::quant::QuantizedMatrix;
use llava_med::quant::pack::{packed_bytes, quantize};
use llava_med::weights::random_values;

/// `[out, in]` of one Mistral-7B decoder layer's products, as this crate fuses them.
const LAYER: [(usize, usize); 4] = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)];

/// How the layer's weights are stored and multiplied.
#[derive(Clone, Copy, PartialEq)]
enum Format {
    /// Packed at this many bits (`QuantizedMatrix`).
    Int(usize),
    /// f32 through the float `Linear` layer (the model's path).
    Layer,
    /// f32 through Burn's product alone.
    Burn,
}

/// One matrix product of the layer, `x` → `x · Wᵀ`.
type Product = Box<dyn Fn(Tensor<2>) -> Tensor<2>>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let (mut runs, mut rows, mut layers) = (10usize, 1usize, 2usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} takes a number"))
        };
        match a.as_str() {
            "--runs" => runs = value("--runs").max(1),
            "--rows" => rows = value("--rows").max(1),
            "--layers" => layers = value("--layers").max(1),
            other => panic!("unknown argument {other} (--runs N, --rows M, --layers L)"),
        }
    }
    let device = Device::flex();
    let weights_per_layer: usize = LAYER.iter().map(|(o, i)| o * i).sum();
    for format in [Format::Int(8), Format::Int(4), Format::Layer, Format::Burn] {
        let mut products: Vec<Product> = Vec::new();
        let mut bytes = 0usize;
        let mut quantize_s = 0.0;
        for l in 0..layers {
            for (j, &(out, inp)) in LAYER.iter().enumerate() {
                let w = random_values((l * 8 + j) as u64 + 1, out * inp);
                if let Format::Int(bits) = format {
                    bytes += packed_bytes(out, inp, bits, 2);
                    let t = Instant::now();
                    let packed = quantize(&w, out, inp, bits, DType::F16);
                    quantize_s += t.elapsed().as_secs_f64();
                    let m = QuantizedMatrix::upload(packed, &device, DType::F32);
                    products.push(Box::new(move |x| m.matmul_t(x)));
                } else {
                    bytes += out * inp * 4;
                    // Stored [in, out] as the float `Linear` keeps it (random values either way).
                    let t = Tensor::<2>::from_data(TensorData::new(w, [inp, out]), &device);
                    if format == Format::Layer {
                        let layer = Linear::float(t, None);
                        products.push(Box::new(move |x| layer.forward(x)));
                    } else {
                        products.push(Box::new(move |x| x.matmul(t.clone())));
                    }
                }
            }
        }
        let inputs: Vec<Tensor<2>> = LAYER
            .iter()
            .map(|&(_, inp)| Tensor::random([rows, inp], Distribution::Normal(0.0, 1.0), &device))
            .collect();
        let pass = || {
            for (i, product) in products.iter().enumerate() {
                let y = product(inputs[i % LAYER.len()].clone());
                // Reading one value back waits for the product.
                let _ = y.slice([0..1, 0..1]).into_data();
            }
        };
        pass();
        let times: Vec<f64> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                pass();
                t.elapsed().as_secs_f64() * 1e3 / layers as f64
            })
            .collect();
        let ms = median(times.clone());
        let name = match format {
            Format::Int(bits) => format!("int{bits}"),
            Format::Layer => "f32".to_string(),
            Format::Burn => "f32-burn".to_string(),
        };
        println!(
            "{}",
            serde_json::json!({
                "format": name,
                "rows": rows,
                "layers": layers,
                "ms_per_layer": {
                    "median": ms,
                    "min": times.iter().cloned().fold(f64::MAX, f64::min),
                    "max": times.iter().cloned().fold(0.0, f64::max),
                },
                "gweights_per_s": weights_per_layer as f64 / ms / 1e6,
                "weight_gb_per_s": bytes as f64 / layers as f64 / ms / 1e6,
                "quantize_ns_per_weight": matches!(format, Format::Int(_))
                    .then(|| quantize_s * 1e9 / (weights_per_layer * layers) as f64),
            })
        );
    }
}
