//! What one decoding step is made of on a GPU, op by op: the cost of launching a kernel, and each matrix
//! product of a Mistral-7B decoder layer (fused q/k/v 4096→6144, o 4096→4096, fused gate/up 4096→28672,
//! down 14336→4096) and the output head (4096→32000) for one input row, through Burn's autotuned product,
//! this crate's one-row kernel (`fused::row_matmul`) and the 4-bit packed kernel. Prints one JSON line per
//! measurement: microseconds per call back to back (`us`) and waited for alone (`alone_us`; medians), for
//! launches the CPU time each thread of the process spent per launch (`cpu_us_by_thread`: `DSD-…` is
//! CubeCL's device thread, which encodes and submits every launch) and,
//! for products, the device's time (`alone_us` less a one-value addition's round trip) and the weight
//! bytes read per second in it, which against the GPU's memory bandwidth says how far each is from its
//! floor.
//!
//! ```text
//! cargo run -p llava-med --features wgpu --example gpu_ops -- [--device wgpu|cpu] [--dtype f16|f32]
//!     [--runs N] [--scale S] [--calls N]
//! ```
//!
//! `--scale S` divides every dimension by S (lavapipe caps a buffer at 128 MiB: `--scale 4` runs there).
//! Each product cycles through 4 copies of its weight so that none is served from the GPU's L2 cache.
//! `--calls N` (default 16) sets how many calls run back to back per timed run: on lavapipe the time per
//! call grew with it (from ~8 to ~250 µs for an addition, 37 to 1,100 µs for a small one-row product)
//! while one call waited for alone stayed at 10–45 µs: CubeCL's launch channel holds 32 tasks and the
//! caller spins while it is full, which on 2 cores slows lavapipe's kernels. On a GPU machine the
//! back-to-back figure is the slower of CubeCL's device thread's time per launch and the GPU's per kernel.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::tensor::{DType, Device, Distribution, Tensor};
use llava_med::fused::extension::row_matmul;
use llava_med::quant::QuantizedMatrix;
use llava_med::quant::pack::{packed_bytes, quantize};

/// `(in, out)` of each product of one decoder layer, and the output head.
const PRODUCTS: [(&str, usize, usize); 5] = [
    ("qkv", 4096, 6144),
    ("o", 4096, 4096),
    ("gate_up", 4096, 28672),
    ("down", 14336, 4096),
    ("lm_head", 4096, 32000),
];
/// Weight copies each product cycles through.
const COPIES: usize = 4;
/// Calls per timed run unless `--calls` says otherwise.
const CALLS: usize = 16;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Waits for the device by reading one value back.
fn sync(t: &Tensor<2>) {
    let _ = t.clone().slice([0..1, 0..1]).into_data();
}

/// Median microseconds per call of `f` over `runs` runs of `calls` calls submitted back to back, then one
/// wait, after one warm-up run (which also lets autotuning pick its kernel).
fn time(runs: usize, calls: usize, mut f: impl FnMut(usize) -> Tensor<2>) -> f64 {
    let mut run = || {
        let start = Instant::now();
        let mut last = f(0);
        for i in 1..calls {
            last = f(i);
        }
        sync(&last);
        start.elapsed().as_secs_f64() * 1e6 / calls as f64
    };
    run();
    median((0..runs).map(|_| run()).collect())
}

/// Median microseconds of one call of `f` and the wait for its result, over `runs · calls` calls: with
/// the same figure for a one-value addition subtracted, the call's time on the device. (The 2026-11-27
/// H200 figures of [`time`] were faster than the memory allows for the largest products, so the calls
/// back to back did not show the devices' work; each call waited for alone cannot hide it.)
fn time_alone(runs: usize, calls: usize, mut f: impl FnMut(usize) -> Tensor<2>) -> f64 {
    sync(&f(0));
    median(
        (0..runs * calls)
            .map(|i| {
                let start = Instant::now();
                sync(&f(i));
                start.elapsed().as_secs_f64() * 1e6
            })
            .collect(),
    )
}

/// CPU time of each of this process's threads so far, in nanoseconds, by thread id, with the thread's
/// name (Linux: `/proc/self/task/*/schedstat`; empty elsewhere).
fn thread_cpu_ns() -> BTreeMap<u64, (String, u64)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return BTreeMap::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_string_lossy().parse().ok()?;
            let read = |f: &str| std::fs::read_to_string(task.path().join(f)).ok();
            let ns = read("schedstat")?.split_whitespace().next()?.parse().ok()?;
            Some((tid, (read("comm")?.trim().to_string(), ns)))
        })
        .collect()
}

/// Microseconds of CPU per call between two [`thread_cpu_ns`] snapshots, summed over threads of one name
/// (digits left out, so numbered worker threads count together).
fn cpu_us_per_call(
    before: &BTreeMap<u64, (String, u64)>,
    after: &BTreeMap<u64, (String, u64)>,
    calls: usize,
) -> BTreeMap<String, f64> {
    let mut by_name = BTreeMap::new();
    for (tid, (name, ns)) in after {
        let spent = ns - before.get(tid).map_or(0, |b| b.1.min(*ns));
        let name: String = name.chars().filter(|c| !c.is_ascii_digit()).collect();
        *by_name.entry(name).or_insert(0.0) += spent as f64 / 1e3 / calls.max(1) as f64;
    }
    by_name.retain(|_, us| *us >= 0.05);
    by_name
}

fn main() {
    let (mut runs, mut scale, mut calls) = (5usize, 1usize, CALLS);
    let (mut device_name, mut dtype_name) = ("wgpu".to_string(), "f16".to_string());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} takes a value"));
        match a.as_str() {
            "--runs" => runs = value().parse().expect("--runs takes a number"),
            "--scale" => scale = value().parse().expect("--scale takes a number"),
            "--calls" => calls = value().parse().expect("--calls takes a number"),
            "--device" => device_name = value(),
            "--dtype" => dtype_name = value(),
            other => panic!("unknown argument {other}"),
        }
    }
    let device = match device_name.as_str() {
        "wgpu" => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
        "cpu" => Device::flex(),
        other => panic!("unknown device {other} (wgpu, cpu)"),
    };
    let dtype = match dtype_name.as_str() {
        "f16" => DType::F16,
        "f32" => DType::F32,
        other => panic!("unknown dtype {other} (f16, f32)"),
    };
    let bytes_per = if dtype == DType::F16 { 2 } else { 4 };
    let adapter = llava_med::device::gpu_adapter();

    // Launch cost: a chain of additions on a one-value tensor, each its own kernel; and the CPU time each
    // of this process's threads spent per launch meanwhile (CubeCL's device thread, the caller, a
    // driver's own threads), which says whether back-to-back launches are bound by the host.
    let one = Tensor::<2>::zeros([1, 1], &device).cast(dtype);
    let before = thread_cpu_ns();
    let launch_us = time(runs, calls, |_| one.clone() + 1.0);
    let cpu_us = cpu_us_per_call(&before, &thread_cpu_ns(), (runs + 1) * calls);
    let round_trip_us = time_alone(runs, calls, |_| one.clone() + 1.0);
    println!(
        "{}",
        serde_json::json!({"op": "launch (add on 1 value)", "us": launch_us,
                           "alone_us": round_trip_us, "cpu_us_by_thread": cpu_us,
                           "device": device_name, "adapter": adapter})
    );

    // The dense products first, all of them, then the 4-bit ones: quantising on the host is the slow part,
    // and a caller's time limit should cut that rather than the dense figures.
    for int4 in [false, true] {
        for (name, k, n) in PRODUCTS {
            let (k, n) = (k / scale, n / scale);
            let x =
                Tensor::<2>::random([1, k], Distribution::Normal(0.0, 1.0), &device).cast(dtype);
            // A row per output, `[n, k]`, as linear layers keep them on CubeCL devices.
            let ws: Vec<Tensor<2>> = (0..COPIES)
                .map(|_| {
                    Tensor::<2>::random([n, k], Distribution::Normal(0.0, 0.02), &device)
                        .cast(dtype)
                })
                .collect();
            // `us`: per call back to back; `alone_us`: one call waited for, less a one-value addition's
            // round trip, from which the bandwidth is reckoned.
            let report = |kernel: &str, (us, alone): (f64, f64), bytes: usize| {
                let bytes = bytes as f64;
                let device_us = (alone - round_trip_us).max(1.0);
                println!(
                    "{}",
                    serde_json::json!({"op": name, "k": k, "n": n, "kernel": kernel,
                                       "dtype": dtype_name, "us": us, "alone_us": alone,
                                       "device_us": device_us, "weight_mb": bytes / 1e6,
                                       "gb_per_s": bytes / (device_us * 1e-6) / 1e9})
                );
            };
            let both = |f: &mut dyn FnMut(usize) -> Tensor<2>| {
                (time(runs, calls, &mut *f), time_alone(runs, calls, f))
            };
            if !int4 {
                let burn = both(&mut |i| x.clone().matmul(ws[i % COPIES].clone().transpose()));
                report("burn matmul", burn, k * n * bytes_per);
                let row = both(&mut |i| row_matmul(x.clone(), ws[i % COPIES].clone()));
                report("row_matmul", row, k * n * bytes_per);
                continue;
            }
            // The same product as 4-bit packed weights (`[out, in]`), as `--quant int4` stores them.
            let packed: Vec<QuantizedMatrix> = ws
                .iter()
                .map(|w| {
                    let host = w
                        .clone()
                        .cast(DType::F32)
                        .into_data()
                        .convert::<f32>()
                        .try_to_vec::<f32>()
                        .expect("f32 weights");
                    QuantizedMatrix::upload(quantize(&host, n, k, 4, dtype), &device, dtype)
                })
                .collect();
            let int4 = both(&mut |i| packed[i % COPIES].matmul_t(x.clone()));
            report("int4 packed", int4, packed_bytes(n, k, 4, bytes_per));
        }
    }
}
