#!/usr/bin/env bash
# The GPU benchmark for a session lent a device machine (/work/.library/device/README.md): one call of ≤ 10 minutes.
#
#   bench/device.sh prepare   here: scripts/gpu-check.sh prepare (stripped test binary + CLI in .gpu/, the
#                             Vulkan loader debs in .gl/), examples/gpu_ops.rs and the CLI built with Burn's
#                             `vulkan` feature (SPIR-V) as .gpu/llava-med-vulkan, and the CLI optimised as
#                             .gpu/llava-med-release
#   bench/device.sh run       there (device `run`, carry [".gpu", ".gl"], timeout_s 590), each step under its
#                             own limit, in order: parity on the GPU (scripts/gpu-check.sh run); the SPIR-V
#                             CLI's generation checked against WGSL's and its `bench --shape 7b`; CubeCL's
#                             per-kernel profile of a short `7b` run (bench/cubecl_profile.py); a launch and
#                             each 7B-layer product alone (examples/gpu_ops.rs); the optimised CLI's `bench
#                             --shape 7b` and the debug CLI's at one context; then, if time is left, the
#                             comparison with transformers eager and the fraction of the bandwidth floor,
#                             and torch.compile (BUDGET, default 560 s); all into $OUT
#                             (SHAPE=tiny OPS_SCALE=8 TORCH_DEVICE=cpu runs it on lavapipe here; the SPIR-V
#                             steps are skipped when SKIP_VULKAN=1, as lavapipe crashes with SPIR-V)
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
  # The CLI optimised (release profile, ~25 minutes the first time on 2 cores).
  cargo build --release -p llava-med --features wgpu --bin llava-med || exit
  strip -o .gpu/llava-med-release "$CARGO_TARGET_DIR/release/llava-med" && xz -9 -T2 -f .gpu/llava-med-release
  # The same CLI through SPIR-V (its own feature set: the first build takes ~20 minutes on 2 cores).
  cargo build -p llava-med --features vulkan --bin llava-med || exit
  strip -o .gpu/llava-med-vulkan "$CARGO_TARGET_DIR/debug/llava-med" && xz -9 -T2 -f .gpu/llava-med-vulkan
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
  status() { echo "$1: exit $2 at $(($(date +%s) - t0)) s" | tee -a "$out/device-status.txt"; }
  shape="${SHAPE:-7b}"
  scripts/gpu-check.sh unpack gpu-ops || exit
  for b in llava-med-vulkan llava-med-release; do
    [ -f ".gpu/$b.xz" ] && scripts/gpu-check.sh unpack "$b"
  done
  export LLAVA_MED_LOG=llava_med=info NO_COLOR=1
  # Parity on the GPU, decoding's products through the one-row kernel (the default since 2026-11-27; also
  # unpacks the loader, the test binary and the CLI).
  OUT="$out" timeout 90 scripts/gpu-check.sh run
  status parity $?
  snap
  [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] &&
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  # The SPIR-V compiler (Burn's `vulkan` feature), which can reach the tensor cores through Vulkan's
  # cooperative matrices (WGSL cannot): the tiny fixture must generate what it generated through WGSL
  # (same driver, f32), then the `7b` bench. Lavapipe crashed with it, so only a GPU can tell.
  if [ -x .gpu/llava-med-vulkan ] && [ "${SKIP_VULKAN:-0}" != 1 ]; then
    fixture=model/tests/fixtures/tiny-llava-med-mistral
    for side in wgpu:llava-med vulkan:llava-med-vulkan; do
      IFS=: read -r dev bin <<<"$side"
      timeout 60 ".gpu/$bin" generate --model "$fixture" --device "$dev" --dtype f32 --image "$fixture/image.png" \
        --prompt "What is shown?" --max-new-tokens 32 >"$out/generate-$dev-f32.txt" 2>"$out/generate-$dev.log"
      status "$dev generate" $?
    done
    if [ -s "$out/generate-vulkan-f32.txt" ] && cmp -s "$out/generate-vulkan-f32.txt" "$out/generate-wgpu-f32.txt"; then
      echo "vulkan f32 generation = wgpu f32 generation" | tee -a "$out/device-status.txt"
    else
      echo "vulkan f32 generation DIFFERS from wgpu's" | tee -a "$out/device-status.txt"
    fi
    timeout 150 .gpu/llava-med-vulkan bench --shape "$shape" --device vulkan --dtype f16 --runs 1 \
      --new-tokens 16 --prompt-tokens 512 --json >"$out/vulkan-7b.json" 2>"$out/vulkan-7b.log"
    status "vulkan bench" $?
    grep -h "bench: " "$out/vulkan-7b.log" | sed 's/.*bench: /  /'
    snap
  fi
  # CubeCL's own profile of a short run (each kernel timed on the GPU, and which product autotune chose
  # for each shape with its candidates' times), summarised; the raw log (MBs of kernel sources) stays there.
  # Profiling syncs after every kernel, so one short context only.
  CUBECL_DEBUG_LOG="$out/cubecl.log" CUBECL_DEBUG_OPTION=profile-medium timeout 70 .gpu/llava-med bench \
    --shape "$shape" --device wgpu --dtype f16 --runs 1 --new-tokens 8 --prompt-tokens 16 --contexts 128 \
    --json >"$out/profiled-7b.json" 2>"$out/profiled-7b.log"
  status profile $?
  python3 bench/cubecl_profile.py "$out/cubecl.log" >"$out/profile-summary.txt" 2>&1
  rm -f "$out/cubecl.log"
  head -30 "$out/profile-summary.txt"
  snap
  # Op by op: a launch, and each product of a decoder layer through Burn's matmul, the one-row kernel and
  # the 4-bit kernel, with the bandwidth each reaches.
  timeout 40 .gpu/gpu-ops --scale "${OPS_SCALE:-1}" >"$out/gpu-ops.jsonl" 2>"$out/gpu-ops.log"
  status gpu-ops $?
  cat "$out/gpu-ops.jsonl"
  snap
  # Decoding through wgpu is bound by its launches (~40 µs each back to back on the H200, debug build):
  # the optimised build's whole `bench`, then the debug build at one context, to tell how much of that
  # cost the build profile makes.
  bin=.gpu/llava-med
  if [ -x .gpu/llava-med-release ]; then
    bin=.gpu/llava-med-release
    for side in release:llava-med-release:128,512,2048:120 debug:llava-med:512:60; do
      IFS=: read -r name b contexts limit <<<"$side"
      t=$(left)
      [ "$t" -gt 40 ] || { echo "$name: skipped, ${t} s left" | tee -a "$out/device-status.txt"; continue; }
      timeout $((t > limit ? limit : t - 10)) ".gpu/$b" bench --shape "$shape" --device wgpu --dtype f16 \
        --runs 1 --new-tokens 16 --prompt-tokens 512 --contexts "$contexts" --json >"$out/$name-7b.json" \
        2>"$out/$name-7b.log"
      status "$name bench" $?
      grep -h "bench: " "$out/$name-7b.log" | sed 's/.*bench: /  /'
      snap
    done
  fi
  # Ours (f16) beside transformers eager when time is left for both (measured on 2026-11-27: ours ~120 s
  # for one run, eager ~40 s); torch.compile runs last.
  t=$(left)
  if [ "$t" -gt 200 ]; then
    env LLAVA_MED_BIN="$PWD/$bin" bench/compare --shape "$shape" --device wgpu --dtype f16 \
      --torch-device "${TORCH_DEVICE:-cuda}" --runs 2 --new-tokens 32 --timeouts "$((t - 70)),60,skip" \
      --out "$out/bench-7b.json" >"$out/bench-7b.txt" 2>"$out/bench-7b.log"
    status bench $?
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
    status "torch compiled" $?
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
