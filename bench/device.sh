#!/usr/bin/env bash
# The GPU benchmark for a session lent a device machine (/work/.library/device/README.md): one call of ≤ 10 minutes.
#
#   bench/device.sh prepare   here: scripts/gpu-check.sh prepare (stripped test binary + CLI in .gpu/, the
#                             Vulkan loader debs in .gl/)
#   bench/device.sh run       there (device `run`, carry [".gpu", ".gl"], timeout_s 590): parity on the GPU
#                             (scripts/gpu-check.sh run), then `llava-med bench --shape 7b` in f16 through wgpu
#                             on the NVIDIA Vulkan driver beside transformers eager on CUDA, the fraction of
#                             the bandwidth floor, our int4 and fusion-backend figures, and transformers with
#                             torch.compile in what time is left (BUDGET, default 560 s); all into $OUT
#                             (SHAPE=tiny TORCH_DEVICE=cpu runs it on lavapipe here, to check the mechanics)
#
# burn-cuda cannot be built in this workplace, so our side runs through wgpu/Vulkan; PyTorch and transformers
# are preinstalled on the device machine.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  scripts/gpu-check.sh prepare || exit
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llava-med-target}"
  cargo build -p llava-med --features wgpu,fusion --bin llava-med || exit
  strip -o .gpu/llava-med-fusion "$CARGO_TARGET_DIR/debug/llava-med" && xz -9 -T2 -f .gpu/llava-med-fusion
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
  scripts/gpu-check.sh unpack llava-med-fusion || exit
  export LLAVA_MED_LOG=llava_med=info
  # Parity on the GPU (also unpacks the loader, the test binary and the CLI).
  OUT="$out" timeout 100 scripts/gpu-check.sh run
  echo "parity: exit $? at $(($(date +%s) - t0)) s" | tee "$out/device-status.txt"
  snap
  [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] &&
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  # Ours (f16) beside transformers eager; torch.compile runs last, with what time is left.
  env LLAVA_MED_BIN="$PWD/.gpu/llava-med" bench/compare --shape "$shape" --device wgpu --dtype f16 \
    --torch-device "${TORCH_DEVICE:-cuda}" --runs 2 --new-tokens 32 --timeouts 200,100,skip \
    --out "$out/bench-7b.json" >"$out/bench-7b.txt" 2>"$out/bench-7b.log"
  echo "bench: exit $? at $(($(date +%s) - t0)) s" | tee -a "$out/device-status.txt"
  cat "$out/bench-7b.txt"
  python3 - "$out/bench-7b.json" <<'PY' | tee "$out/bandwidth.txt"
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
  # The 4-bit model (what an 8 GB GPU would hold) and the fusion backend, decoding only the short figures.
  for side in int4:llava-med fusion:llava-med-fusion; do
    name=${side%%:*} bin=${side#*:} quant=none
    [ "$name" = int4 ] && quant=int4
    t=$(left)
    [ "$t" -gt 40 ] || { echo "$name: skipped, ${t} s left" | tee -a "$out/device-status.txt"; continue; }
    timeout $((t > 100 ? 100 : t - 10)) ".gpu/$bin" bench --shape "$shape" --device wgpu --dtype f16 \
      --quant "$quant" --runs 1 --new-tokens 16 --json >"$out/$name-7b.json" 2>"$out/$name-7b.log"
    echo "$name: exit $? at $(($(date +%s) - t0)) s" | tee -a "$out/device-status.txt"
    snap
  done
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
