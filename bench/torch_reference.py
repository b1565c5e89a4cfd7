#!/usr/bin/env python3
"""PyTorch/transformers side of `llava-med bench`: the same measurements on
`LlavaForConditionalGeneration` with random weights, built from bench/shapes.json.

Prints exactly one JSON object on stdout (see bench/compare); diagnostics go to stderr.
"""

import argparse
import contextlib
import datetime
import inspect
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from transformers import DynamicCache, LlavaConfig, LlavaForConditionalGeneration

SHAPES = Path(__file__).resolve().parent / "shapes.json"
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DECODE_CONTEXTS = (128, 512, 2048)
QUESTION_TOKENS = 45  # a ~30-word question


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def no_hf_init():
    # HF's own init would be overwritten below; skipping it keeps load_s to one init pass.
    try:
        from transformers.initialization import no_init_weights
        return no_init_weights()
    except ImportError:
        return contextlib.nullcontext()


@torch.no_grad()
def init_random(model, std=0.02):
    """normal(0, std) for weights, zeros for biases, ones/zeros for norms (keeps activations sane)."""
    done = set()
    for mod in model.modules():
        is_norm = isinstance(mod, nn.LayerNorm) or "Norm" in type(mod).__name__
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in done:
                continue
            done.add(id(p))
            if is_norm:
                p.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                p.zero_()
            else:  # Linear/Conv/Embedding weights, CLIP class_embedding
                p.normal_(0.0, std)


def count(*modules):
    unique = {id(p): p for m in modules for p in m.parameters()}  # tied weights count once
    return sum(p.numel() for p in unique.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", action="store_true", help="JSON on stdout (the only output format)")
    args = ap.parse_args()
    if args.runs < 1 or args.new_tokens < 1 or args.prompt_tokens < 1:
        ap.error("--runs, --new-tokens and --prompt-tokens must be >= 1")

    shapes = json.loads(SHAPES.read_text())
    if args.shape not in shapes or args.shape.startswith("_"):
        ap.error(f"unknown shape {args.shape!r}; known: {[k for k in shapes if not k.startswith('_')]}")
    if args.device == "cuda" and not torch.cuda.is_available():
        log("error: --device cuda but torch.cuda.is_available() is false")
        return 2
    if args.compile and not hasattr(torch, "compile"):
        log(f"error: --compile: torch {torch.__version__} has no torch.compile")
        return 2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    config = LlavaConfig(**shapes[args.shape])
    tc, vc = config.text_config, config.vision_config
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    sync()
    t0 = time.perf_counter()
    with no_hf_init(), default_dtype(dtype), dev:
        model = LlavaForConditionalGeneration(config)
    init_random(model)
    if config.tie_word_embeddings:  # no_init_weights also skipped the tying
        model.tie_weights()
    model.eval()
    sync()
    load_s = time.perf_counter() - t0

    params = {
        "language_model": count(model.model.language_model, model.lm_head),
        "vision_tower": count(model.model.vision_tower),
        "projector": count(model.model.multi_modal_projector),
    }

    if args.compile:
        try:
            # Unbounded cache length and prompt sizes would otherwise exhaust the recompile budget and
            # silently fall back to eager.
            for k in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, k):
                    setattr(torch._dynamo.config, k, 64)
            model.model.language_model = torch.compile(model.model.language_model)
            model.model.vision_tower = torch.compile(model.model.vision_tower)
        except Exception as e:  # noqa: BLE001
            log(f"error: torch.compile failed: {type(e).__name__}: {e}")
            return 2

    vocab = tc.vocab_size
    special = {config.image_token_index, tc.bos_token_id, tc.eos_token_id, getattr(tc, "pad_token_id", None)}
    gen = torch.Generator().manual_seed(0)

    def random_ids(n):
        ids = torch.randint(0, vocab, (n,), generator=gen)
        for s in special:
            if s is not None:
                # Remap specials to a fixed ordinary id rather than resampling (keeps n exact).
                ids[ids == s] = 3 if s != 3 else 4
        return ids.view(1, n).to(dev)

    image_size, patch = vc.image_size, vc.patch_size
    tokens_per_image = (image_size // patch) ** 2

    def pixels():
        return torch.randn(1, 3, image_size, image_size, generator=gen).to(dev, dtype)

    def new_cache():
        return DynamicCache(config=config)

    # transformers renamed `past_key_values` to `cache` during 5.x (5.17 has the old name, 5.24 the new);
    # an unknown keyword would be swallowed by **kwargs and every step would run without its cache.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(ids, cache, pixel_values=None):
        before = cache.get_seq_length()
        out = model(input_ids=ids, pixel_values=pixel_values, use_cache=True, logits_to_keep=1,
                    **{cache_kw: cache})
        if cache.get_seq_length() != before + ids.shape[1]:
            raise RuntimeError(f"the KV cache did not grow by {ids.shape[1]} positions through "
                               f"`{cache_kw}=` (transformers {transformers.__version__})")
        return out

    def argmax_host(out):
        return int(out.logits[0, -1].argmax().item())

    def timed(fn, runs):
        fn()  # warm-up (and compilation with --compile)
        ts = []
        for _ in range(runs):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return ts

    R, K, N = args.runs, args.new_tokens, args.prompt_tokens
    result_decode = []
    try:
        with torch.inference_mode():
            # Vision tower + projector.
            px = pixels()

            def vision():
                feats = model.get_image_features(
                    pixel_values=px,
                    vision_feature_layer=config.vision_feature_layer,
                    vision_feature_select_strategy=config.vision_feature_select_strategy,
                )
                # transformers 5.x returns a model output whose pooler_output is the projected list.
                f = feats.pooler_output if hasattr(feats, "pooler_output") else feats
                f = f[0] if isinstance(f, (list, tuple)) else f
                assert f.shape[-2:] == (tokens_per_image, tc.hidden_size), f.shape
                return f

            vision_ms = [t * 1e3 for t in timed(vision, R)]

            # Prefill from an empty cache.
            prompt = random_ids(N)

            def prefill():
                out = forward(prompt, new_cache())
                out.logits[0, -1].float().sum().item()  # logits materialised on the host side

            prefill_tps = [N / t for t in timed(prefill, R)]

            # Decode at fixed contexts: K greedy steps, each token read back to the host.
            for C in DECODE_CONTEXTS:
                if C >= tc.max_position_embeddings:
                    log(f"skipping decode at context {C} (max_position_embeddings {tc.max_position_embeddings})")
                    continue
                ctx_ids = random_ids(C)
                cache = new_cache()
                first = argmax_host(forward(ctx_ids, cache))

                def rewind():
                    nonlocal cache
                    if hasattr(cache, "crop"):
                        # Reuse the context's KV rather than a fresh prefill per run. A negative
                        # argument (tokens to drop) is what transformers 5.x accepts, and 4.x too.
                        extra = cache.get_seq_length() - C
                        if extra > 0:
                            cache.crop(-extra)
                    else:
                        cache = new_cache()
                        forward(ctx_ids, cache)

                def steps():
                    tok = first
                    for _ in range(K):
                        tok = argmax_host(forward(torch.tensor([[tok]], device=dev), cache))

                # Warm-up. With --compile a second one also covers the cropped cache's strides,
                # which would otherwise recompile inside the first timed run.
                for _ in range(2 if args.compile else 1):
                    rewind()
                    steps()
                ts = []
                for _ in range(R):  # only the K steps are timed, not the context's prefill
                    rewind()
                    sync()
                    t = time.perf_counter()
                    steps()
                    ts.append(time.perf_counter() - t)
                result_decode.append({
                    "context": C,
                    "tokens_per_s": stats([K / t for t in ts]),
                    "ms_per_token": stats([t * 1e3 / K for t in ts]),
                })
                del cache

            # Time to first token: image + question, from pixel tensor to first id on the host.
            q = random_ids(QUESTION_TOKENS)
            ids = torch.cat([
                torch.tensor([[tc.bos_token_id]], device=dev),
                torch.full((1, tokens_per_image), config.image_token_index, device=dev),
                q,
            ], dim=1)
            px2 = pixels()

            def ttft():
                return argmax_host(forward(ids, new_cache(), pixel_values=px2))

            ttft_ms = [t * 1e3 for t in timed(ttft, R)]

            # A follow-up question in the same conversation, the image and first question kept in the
            # cache (past_key_values carried over and cropped back, as a careful caller would).
            q2 = random_ids(QUESTION_TOKENS)
            turn = new_cache()
            forward(ids, turn, pixel_values=px2)
            first_turn = turn.get_seq_length()

            def ttft_follow_up():
                extra = turn.get_seq_length() - first_turn
                if extra > 0:
                    turn.crop(-extra)
                return argmax_host(forward(q2, turn))

            # Without `crop` (older transformers) the cache cannot be rewound between runs. With --compile
            # an extra warm-up covers the cropped cache's strides (as for decoding above).
            ttft_follow_up_ms = None
            if hasattr(turn, "crop"):
                if args.compile:
                    ttft_follow_up()
                ttft_follow_up_ms = [t * 1e3 for t in timed(ttft_follow_up, R)]
    except Exception as e:  # noqa: BLE001
        if args.compile:
            log(f"error: torch.compile run failed: {type(e).__name__}: {e}")
            return 2
        raise

    out = {
        "implementation": "pytorch",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "compile": bool(args.compile),
        "shape": args.shape,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "params": params,
        "runs": R,
        "new_tokens": K,
        "prompt_tokens": N,
        "load_s": load_s,
        "vision_ms": stats(vision_ms),
        "prefill_tokens_per_s": stats(prefill_tps),
        "decode": result_decode,
        "ttft_ms": stats(ttft_ms),
        "ttft_follow_up_ms": stats(ttft_follow_up_ms) if ttft_follow_up_ms else None,
        "peak_host_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
