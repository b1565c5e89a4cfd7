#!/usr/bin/env python3
"""Writes a checkpoint of random weights in one of bench/shapes.json's shapes to a folder, as transformers'
`LlavaForConditionalGeneration.save_pretrained` lays it out (config.json + safetensors shards), for
`llava-med bench --model DIR`: loading real files (f16 conversion, the quantised-weights cache) measured on
a 7B-sized checkpoint no one has to download. Weights as torch_reference.py draws them (normal(0, 0.02),
unit norms, zero biases). Not a test fixture: a 7B checkpoint is ~15 GB; write it outside the repository.

    python3 bench/random_checkpoint.py --shape 7b --dtype f16 --out /tmp/llava-7b-random
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_reference import DTYPES, SHAPES, default_dtype, init_random, no_hf_init  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True)
    ap.add_argument("--dtype", default="f16", choices=sorted(DTYPES))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shard-size", default="2GB", help="largest shard (transformers' max_shard_size)")
    args = ap.parse_args()
    shapes = json.loads(SHAPES.read_text())
    if args.shape not in shapes or args.shape.startswith("_"):
        ap.error(f"unknown shape {args.shape!r} (shapes.json has {[s for s in shapes if not s.startswith('_')]})")
    torch.manual_seed(0)
    config = LlavaConfig(**shapes[args.shape])
    with no_hf_init(), default_dtype(DTYPES[args.dtype]):
        model = LlavaForConditionalGeneration(config)
    init_random(model)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(args.out, max_shard_size=args.shard_size, safe_serialization=True)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
