#!/usr/bin/env bash
# The main job, on a fresh Debian/Ubuntu machine: builds `llava-med` optimised (the debug build the tests use
# runs the model about half as fast) and answers a question about the bundled sample image. Uses the real
# model when LLAVA_MED_MODEL (or ~/.cache/llava-med/models/llava-med-v1.5-mistral-7b) holds one; otherwise
# the tiny random-weight test model, whose answer is meaningless but exercises the whole pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llava-med-target}"
command -v cc >/dev/null || { SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo; $SUDO apt-get update -qq; $SUDO apt-get install -y -qq build-essential; }
command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup (https://rustup.rs)"; exit 1; }

model="${LLAVA_MED_MODEL:-$HOME/.cache/llava-med/models/llava-med-v1.5-mistral-7b}"
if [ ! -f "$model/config.json" ]; then
  echo "note: no real model at $model; using the tiny random-weight test model (its answer is noise)." >&2
  echo "      See README.md, 'Real weights', to get microsoft/llava-med-v1.5-mistral-7b." >&2
  model=model/tests/fixtures/tiny-llava-med-mistral
fi
image="${1:-assets/samples/phantom-ct.png}"
question="${2:-What does this image show?}"
cargo run -q --release -p llava-med --features wgpu --bin llava-med -- generate --model "$model" --image "$image" --prompt "$question" \
  --device "${LLAVA_MED_DEVICE:-auto}" --max-new-tokens "${LLAVA_MED_MAX_NEW_TOKENS:-128}"
