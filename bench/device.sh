#!/usr/bin/env bash
# The GPU benchmark for a session lent a device machine (/work/.library/device/README.md): one call of ≤ 10 minutes.
#
#   bench/device.sh prepare   here: scripts/gpu-check.sh prepare (stripped test binary + CLI in .gpu/, the
#                             Vulkan loader debs in .gl/)
#   bench/device.sh run       there (device `run`, carry [".gpu", ".gl"], timeout_s 590), each step under its
#                             own limit, in order: parity on the GPU (scripts/gpu-check.sh run); a launch and
#                             each 7B-layer product alone (examples/gpu_ops.rs); CubeCL's per-kernel profile
#                             of a short `7b` run (bench/cubecl_profile.py); `bench --shape 7b` with the
#                             one-row kernel, without it, and in int4; then, if time is left, the comparison
#                             with transformers eager and the fraction of the bandwidth floor, and
#                             torch.compile (BUDGET, default 560 s); all into $OUT
#                             (SHAPE=tiny OPS_SCALE=8 TORCH_DEVICE=cpu runs it on lavapipe here)
#
# burn-cuda cannot be built in this workplace, so our side runs through wgpu/Vulkan; PyTorch and transformers
# are preinstalled on the device machine.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  scripts/gpu-check.sh prepare || exit
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llava-med-target}"
  cargo build -p llava-med --features wgpu --example gpu_ops || exit
  strip -o .gpu/gpu-ops "$CARGO_TARGET_DIR/debug/examples/gpu_ops" && xz -9 -T2 -f .gpu/gpu-ops
  du -sh .gpu
  ;;
run)
  # One call, everything in order of importance, each step under its own limit so a slow or stuck one
  # leaves the rest their time; every step writes into $OUT as it ends. BUDGET (s) bounds the whole.
  # The device tool returns at most 8 files: everything goes to a folder, tarred into $OUT after each
  # step (device-results.tgz), with the status and bandwidth lines beside it.
  dest="${OUT:-/tmp}"
  out=$(mktemp -d)
  snap() {
    tar czf "$dest/device-results.tgz" -C "$out" .
    cp "$out/device-status.txt" "$dest/" 2>/dev/null
    cp "$out/bandwidth.txt" "$dest/" 2>/dev/null
    true
  }
  t0=$(date +%s)
  left() { echo $((${BUDGET:-560} - ($(date +%s) - t0))); }
  shape="${SHAPE:-7b}"
  scripts/gpu-check.sh unpack gpu-ops || exit
  export LLAVA_MED_LOG=llava_med=info NO_COLOR=1
  # Parity on the GPU (also unpacks the loader, the test binary and the CLI).
  OUT="$out" timeout 90 scripts/gpu-check.sh run
  echo "parity: exit $? at $(($(date +%s) - t0)) s" | tee "$out/device-status.txt"
  snap
  [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] &&
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  # Op by op: a launch, and each product of a decoder layer through Burn's matmul, the one-row kernel and
  # the 4-bit kernel, with the bandwidth each reaches.
  timeout 50 .gpu/gpu-ops --scale "${OPS_SCALE:-1}" >"$out/gpu-ops.jsonl" 2>"$out/gpu-ops.log"
  echo "gpu-ops: exit $? at $(($(date +%s) - t0)) s" | tee -a "$out/device-status.txt"
  cat "$out/gpu-ops.jsonl"
  snap
  # CubeCL's own profile of a short run (each kernel timed on the GPU, and which product autotune chose
  # for each shape with its candidates' times), summarised; the raw log (MBs of kernel sources) stays there.
  CUBECL_DEBUG_LOG="$out/cubecl.log" CUBECL_DEBUG_OPTION=profile-medium timeout 70 .gpu/llava-med bench \
    --shape "$shape" --device wgpu --dtype f16 --runs 1 --new-tokens 4 --prompt-tokens 16 --json \
    >"$out/profiled-7b.json" 2>"$out/profiled-7b.log"
  echo "profile: exit $? at $(($(date +%s) - t0)) s" | tee -a "$out/device-status.txt"
  python3 bench/cubecl_profile.py "$out/cubecl.log" >"$out/profile-summary.txt" 2>&1
  rm -f "$out/cubecl.log"
  head -30 "$out/profile-summary.txt"
  snap
  # Decoding's products through the one-row kernel and through Burn's product, same settings, one after
  # the other (the A/B the 2026-11-27 figures call for), then the 4-bit model (what an 8 GB GPU would
  # hold; quantising 7B random weights on the host took 72 s).
  for side in rowmatmul:none:1:90 default:none:0:90 int4:int4:0:150; do
    IFS=: read -r name quant row limit <<<"$side"
    t=$(left)
    [ "$t" -gt 40 ] || { echo "$name: skipped, ${t} s left" | tee -a "$out/device-status.txt"; continue; }
    LLAVA_MED_GPU_ROW_MATMUL=$row timeout $((t > limit ? limit : t - 10)) .gpu/llava-med bench --shape "$shape" \
      --device wgpu --dtype f16 --quant "$quant" --runs 1 --new-tokens 16 --prompt-tokens 128 --json \
      >"$out/$name-7b.json" 2>"$out/$name-7b.log"
    echo "$name: exit $? at $(($(date +%s) - t0)) s" | tee -a "$out/device-status.txt"
    grep -h "bench: decode measured" "$out/$name-7b.log" | sed 's/.*context/  context/'
    snap
  done
  # Ours (f16) beside transformers eager when time is left for both (measured on 2026-11-27: ours ~210 s,
  # eager ~40 s); torch.compile runs last.
  t=$(left)
  if [ "$t" -gt 200 ]; then
    env LLAVA_MED_BIN="$PWD/.gpu/llava-med" bench/compare --shape "$shape" --device wgpu --dtype f16 \
      --torch-device "${TORCH_DEVICE:-cuda}" --runs 2 --new-tokens 32 --timeouts "$((t - 70)),60,skip" \
      --out "$out/bench-7b.json" >"$out/bench-7b.txt" 2>"$out/bench-7b.log"
    echo "bench: exit $? at $(($(date +%s) - t0)) s" | tee -a "$out/device-status.txt"
    cat "$out/bench-7b.txt"
  else
    echo "bench: skipped, ${t} s left" | tee -a "$out/device-status.txt"
  fi
  [ -f "$out/bench-7b.json" ] && python3 - "$out/bench-7b.json" <<'PY' | tee "$out/bandwidth.txt"
import json, subprocess, sys
name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                      capture_output=True, text=True).stdout.strip()
# Peak DRAM bandwidth, GB/s (vendor figures).
table = {"H200": 4800, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "A100": 2039}
bw = next((v for k, v in table.items() if k in name), None)
r = json.load(open(sys.argv[1]))
ours = r.get("ours") or {}
lm_mb = (ours.get("weight_mb") or {}).get("language_model")
if not bw or not lm_mb:
    print(f"no bandwidth figure for {name!r} or no weight size; skipped")
    sys.exit(0)
embed_mb = 32000 * 4096 * 2 / 1e6
floor_ms = (lm_mb - embed_mb) / 1e3 / bw * 1e3
print(f"{name}: {bw} GB/s, decoder weights read per token {lm_mb - embed_mb:.0f} MB, floor {floor_ms:.2f} ms/token")
for side in ("ours", "pytorch_eager", "pytorch_compiled"):
    for d in (r.get(side) or {}).get("decode") or []:
        ms = d["ms_per_token"]["median"]
        print(f"  {side} @ {d['context']}: {ms:.2f} ms/token = {1e3 / ms:.0f} tokens/s, "
              f"{floor_ms / ms * 100:.0f} % of the floor")
PY
  snap
  t=$(left)
  if [ "$t" -gt 60 ]; then
    timeout $((t - 15)) python3 bench/torch_reference.py --shape "$shape" --device "${TORCH_DEVICE:-cuda}" \
      --dtype f16 --runs 2 --new-tokens 32 --compile --json >"$out/compiled-7b.json" 2>"$out/compiled-7b.log"
    echo "torch compiled: exit $? at $(($(date +%s) - t0)) s" | tee -a "$out/device-status.txt"
  else
    echo "torch compiled: skipped, ${t} s left" | tee -a "$out/device-status.txt"
  fi
  snap
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
