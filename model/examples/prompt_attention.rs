//! Prompt attention on the CPU: this crate's kernel (`fused::prompt_attention`) against Burn's own CPU
//! attention on the shapes a time to first token goes through: the `base` shape's vision tower (197
//! patches, full attention), its prompt of an image and a question (~245 positions, causal), a 512-token
//! prefill, and LLaVA-Med 7B's prompt (667 positions, 32 heads of 128). The two alternate run by run, so a
//! busy machine slows both alike. Prints one JSON line per shape: milliseconds (median, min, max) for each
//! and their ratio.
//!
//! ```text
//! cargo run --release -p llava-med --example prompt_attention -- [--runs N]
//! ```

use std::time::Instant;

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Distribution, Tensor};
use llava_med::fused::prompt_attention::prompt_attention;

/// (name, heads, positions, head_dim, causal, layers): one call per layer, as a forward pass makes them.
const SHAPES: [(&str, usize, usize, usize, bool, usize); 4] = [
    ("base vision tower", 12, 197, 64, false, 11),
    ("base prompt (image + question)", 12, 245, 64, true, 12),
    ("base 512-token prefill", 12, 512, 64, true, 12),
    ("7b prompt (image + question)", 32, 667, 128, true, 1),
];

fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    serde_json::json!({"median": v[v.len() / 2], "min": v[0], "max": v[v.len() - 1]})
}

fn main() {
    let mut runs = 10usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--runs", Some(n)) if n > 0 => runs = n,
            _ => {
                eprintln!("usage: prompt_attention [--runs N]");
                std::process::exit(2);
            }
        }
    }
    let device = Device::flex();
    for (name, heads, n, d, causal, layers) in SHAPES {
        let random = || Tensor::<4>::random([1, heads, n, d], Distribution::Default, &device);
        let (q, k, v) = (random(), random(), random());
        let scale = (d as f32).powf(-0.5);
        let ours = || {
            for _ in 0..layers {
                let _ = prompt_attention(q.clone(), k.clone(), v.clone(), causal, scale);
            }
        };
        let burn = || {
            let options = AttentionModuleOptions {
                scale: Some(scale as f64),
                is_causal: causal,
                ..Default::default()
            };
            for _ in 0..layers {
                let _ = attention(q.clone(), k.clone(), v.clone(), None, None, options)
                    .swap_dims(1, 2)
                    .reshape([1, n, heads * d]);
            }
        };
        let time = |f: &dyn Fn()| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        };
        ours();
        burn();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            a.push(time(&ours));
            b.push(time(&burn));
        }
        let (a, b) = (stats(a), stats(b));
        let ratio = a["median"].as_f64().unwrap_or(0.0) / b["median"].as_f64().unwrap_or(1.0);
        println!(
            "{}",
            serde_json::json!({
                "shape": name, "heads": heads, "positions": n, "head_dim": d, "causal": causal,
                "calls": layers, "threads": rayon::current_num_threads(),
                "ours_ms": a, "burn_ms": b, "ours_over_burn": ratio,
            })
        );
    }
}
