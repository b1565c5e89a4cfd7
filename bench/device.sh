#!/usr/bin/env bash
# The GPU benchmark for a session lent a device machine (/work/.library/device/README.md); ≤ 8 minutes.
#
#   bench/device.sh prepare   here: scripts/gpu-check.sh prepare (stripped test binary + CLI in .gpu/, the
#                             Vulkan loader debs in .gl/)
#   bench/device.sh run       there (device `run`, carry [".gpu", ".gl"], timeout_s 540): parity on the GPU
#                             (scripts/gpu-check.sh run), then `llava-med bench --shape 7b` in f16 through wgpu
#                             on the NVIDIA Vulkan driver beside transformers on CUDA (eager and compiled),
#                             and the fraction of the bandwidth floor; everything lands in $OUT
#   bench/device.sh fusion    there, a second call if the budget allows (≤ 4 minutes): our `7b` f16 decode
#                             with and without Burn's fusion backend, one run each, into $OUT
#                             (SHAPE=tiny runs it on lavapipe here, to check the mechanics)
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
fusion)
  out="${OUT:-/tmp}"
  [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] &&
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  # The Vulkan loader from .gl/ only where the machine lacks one (as on the device machine).
  if ! ldconfig -p | grep -q libvulkan.so.1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  scripts/gpu-check.sh unpack llava-med llava-med-fusion || exit
  for b in llava-med llava-med-fusion; do
    timeout 110 ".gpu/$b" bench --shape "${SHAPE:-7b}" --device wgpu --dtype f16 --runs 1 --new-tokens 16 \
      --json >"$out/$b-${SHAPE:-7b}.json" 2>"$out/$b-${SHAPE:-7b}.log"
    echo "$b: exit $?" | tee -a "$out/fusion-status.txt"
  done
  ;;
run)
  out="${OUT:-/tmp}"
  timeout 150 scripts/gpu-check.sh run
  echo "parity: exit $?" | tee "$out/device-status.txt"
  timeout 330 env LLAVA_MED_BIN="$PWD/.gpu/llava-med" bench/compare --shape 7b --device wgpu --dtype f16 \
    --torch-device cuda --runs 2 --new-tokens 32 --out "$out/bench-7b.json" 2>&1 | tee "$out/bench-7b.txt"
  echo "bench: exit $?" | tee -a "$out/device-status.txt"
  # Decoding reads every decoder weight once per token (the embedding table only one row): that over the
  # memory bandwidth is the floor.
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
  ;;
*)
  echo "usage: $0 prepare|run|fusion" >&2
  exit 2
  ;;
esac
