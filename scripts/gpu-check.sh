#!/usr/bin/env bash
# GPU check for a session lent a device machine (see /work/.library/device/README.md).
#
#   scripts/gpu-check.sh prepare   here: build the wgpu test binary and the CLI, copy them to .gpu/ (git-ignored
#                                  via .git/info/exclude), fetch the Vulkan loader debs into .gl/
#   scripts/gpu-check.sh run       there (device `run`, carry [".gpu", ".gl"]): unpack the loader, run the
#                                  parity tests on the GPU's Vulkan driver through wgpu, and one generation
#                                  per float type; a JSON summary goes to $OUT/gpu-check.json
#   scripts/gpu-check.sh unpack B… there: decompress .gpu/B.xz to .gpu/B (xz, else Python's lzma)
#
# burn-cuda cannot be built offline, so the GPU is exercised through wgpu (WGSL) on the NVIDIA Vulkan driver.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llava-med-target}"
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >>.git/info/exclude
  grep -qx '/.gl/' .git/info/exclude 2>/dev/null || echo /.gl/ >>.git/info/exclude
  # Only what this run builds travels: a left-over unpacked binary would push the carry past 64 MiB.
  rm -rf .gpu
  mkdir -p .gpu .gl /tmp/amd64/partial
  bin=$(cargo test -p llava-med --features wgpu --test integration --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"]=="integration"][-1])')
  cargo build -p llava-med --features wgpu --bin llava-med
  # Debug info makes them 1.1 GB each; stripped and xz-compressed they are ~13 MB (gzip: ~20 MB; the carry
  # limit is 64 MiB for all of them).
  strip -o .gpu/integration "$bin" && strip -o .gpu/llava-med "$CARGO_TARGET_DIR/debug/llava-med"
  xz -9 -T2 -f .gpu/integration .gpu/llava-med
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
  # shellcheck disable=SC2086
  apt-get $o update -qq && (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 >/dev/null)
  du -sh .gpu .gl
  ;;
run)
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
  "$0" unpack integration llava-med
  if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  fi
  out="${OUT:-/tmp}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt" || true
  status=0
  export LLAVA_MED_FIXTURES="$PWD/model/tests/fixtures"
  .gpu/integration parity_on_wgpu --nocapture --test-threads=1 2>&1 | tee "$out/parity.log" || status=1
  for dtype in f32 f16; do
    start=$(date +%s%N)
    .gpu/llava-med generate --model model/tests/fixtures/tiny-llava-med-mistral --device wgpu --dtype "$dtype" \
      --image model/tests/fixtures/tiny-llava-med-mistral/image.png --prompt "What is shown?" \
      --max-new-tokens 32 >"$out/generate-$dtype.txt" 2>&1 || status=1
    echo "generate $dtype (load + 32 tokens): $((($(date +%s%N) - start) / 1000000)) ms" | tee -a "$out/parity.log"
  done
  grep -E "max \|Δ\||test result" "$out/parity.log" | python3 -c 'import json,sys; print(json.dumps({"lines": sys.stdin.read().splitlines()}, ensure_ascii=False, indent=1))' >"$out/gpu-check.json"
  exit $status
  ;;
unpack)
  shift
  for b in "$@"; do
    if command -v xz >/dev/null; then
      xz -dkf ".gpu/$b.xz"
    else
      python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        ".gpu/$b.xz" ".gpu/$b"
    fi
    chmod +x ".gpu/$b"
  done
  ;;
*)
  echo "usage: $0 prepare|run|unpack BINARY..." >&2
  exit 2
  ;;
esac
