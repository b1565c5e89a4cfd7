//! Float products on the CPU as the model's layers run them (`linear::Linear::float`: column panels
//! and the AVX2 tiles on AVX2-only CPUs; elsewhere the AMX product, the AVX-512 tiles, one-row streaming
//! or Burn's, by rows) against Burn's own product (gemm) on the `base` shape's layers, at the rows of a
//! decoding step, a follow-up question and a first prompt. The two alternate run by run, so a busy
//! machine slows both alike. `--cold` cycles through copies of each weight past any cache, so each
//! product reads its weight from memory as a model's layers do. Prints one JSON line per product:
//! milliseconds (median, min, max) and GFLOP/s for each. `LLAVA_MED_CPU_AMX=0` measures the AVX-512 path
//! as "ours".
//!
//! ```text
//! cargo run --release -p llava-med --example prompt_matmul -- [--runs N] [--cold]
//! ```

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use llava_med::bench::stats;
use llava_med::linear::Linear;

/// (layer, inputs, outputs) of the `base` shape.
const PRODUCTS: [(&str, usize, usize); 5] = [
    ("lm qkv", 768, 2304),
    ("lm o / vision o", 768, 768),
    ("lm gate/up", 768, 6144),
    ("lm down / vision fc2", 3072, 768),
    ("vision fc1", 768, 3072),
];
/// Input rows: decoding (1, 4 in a batch), a follow-up question (45), a text prompt, the vision tower
/// (197), a prompt with an image.
const ROWS: [usize; 9] = [1, 4, 16, 45, 64, 128, 197, 242, 512];
/// Bytes of weight copies with `--cold`: eight times the largest L3 of the machines measured.
const COLD_BYTES: usize = 256 << 20;

fn main() {
    let mut runs = 10usize;
    let mut cold = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--cold" {
            cold = true;
            continue;
        }
        match (a.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--runs", Some(n)) if n > 0 => runs = n,
            _ => {
                eprintln!("usage: prompt_matmul [--runs N] [--cold]");
                std::process::exit(2);
            }
        }
    }
    llava_med::host_memory::keep_freed_blocks();
    let device = Device::flex();
    // The process's first products run slow (threads starting, pages first touched): one unreported.
    let (x, w) = (
        Tensor::<2>::random([256, 768], Distribution::Default, &device),
        Tensor::<2>::random([768, 3072], Distribution::Default, &device),
    );
    let layer = Linear::float(w.clone(), None);
    for _ in 0..3 {
        let _ = (
            layer.forward(x.clone()).into_data(),
            x.clone().matmul(w.clone()).into_data(),
        );
    }
    for (name, k, n) in PRODUCTS {
        // With `--cold`, copies of the weight past any cache, taken in turn: each product reads its
        // weight from memory, as a model's layers do.
        let copies = if cold {
            (COLD_BYTES / (4 * k * n)).max(2)
        } else {
            1
        };
        let weights: Vec<(Tensor<2>, Linear)> = (0..copies)
            .map(|_| {
                let w = Tensor::<2>::random([k, n], Distribution::Default, &device);
                (w.clone(), Linear::float(w, None))
            })
            .collect();
        let next = std::cell::Cell::new(0usize);
        let weight = || {
            let i = next.get();
            next.set((i + 1) % copies);
            &weights[i]
        };
        for m in ROWS {
            let x = Tensor::<2>::random([m, k], Distribution::Default, &device);
            let time = |f: &dyn Fn() -> Tensor<2>| {
                let start = Instant::now();
                let y = f();
                let _ = y.into_data();
                start.elapsed().as_secs_f64() * 1e3
            };
            let ours = || weight().1.forward(x.clone());
            let burn = || x.clone().matmul(weight().0.clone());
            let (mut a, mut b) = (Vec::new(), Vec::new());
            // One warm-up each, not reported.
            for run in 0..=runs {
                let (ta, tb) = (time(&ours), time(&burn));
                if run > 0 {
                    a.push(ta);
                    b.push(tb);
                }
            }
            let gflops = |ms: &serde_json::Value| {
                2.0 * (m * k * n) as f64 / ms["median"].as_f64().unwrap_or(f64::NAN) / 1e6
            };
            let (a, b) = (stats(a), stats(b));
            println!(
                "{}",
                serde_json::json!({"product": name, "m": m, "k": k, "n": n, "cold": cold,
                    "ours_ms": a, "burn_ms": b,
                    "ours_gflops": gflops(&a), "burn_gflops": gflops(&b)})
            );
        }
    }
}
