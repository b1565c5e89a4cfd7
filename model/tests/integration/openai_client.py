"""The real `openai` Python client against `llava-med serve` (run by tests/integration/serve.rs).

Usage: openai_client.py BASE_URL MODEL IMAGE PROMPT MAX_TOKENS
Prints one JSON object: the non-streaming and streaming answers with their usage, the model list, and the
HTTP statuses the client saw for an unknown model and an undecodable image.
"""

import base64
import json
import sys

import openai
from openai import OpenAI


def main() -> None:
    base_url, model, image, prompt, max_tokens = sys.argv[1:6]
    client = OpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=120)
    with open(image, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
            ],
        }
    ]
    out = {}
    r = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=int(max_tokens)
    )
    out["nonstream"] = {
        "text": r.choices[0].message.content,
        "finish_reason": r.choices[0].finish_reason,
        "prompt_tokens": r.usage.prompt_tokens,
        "completion_tokens": r.usage.completion_tokens,
    }
    text, finish, usage = "", None, None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_completion_tokens=int(max_tokens),
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices:
            choice = chunk.choices[0]
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    out["stream"] = {
        "text": text,
        "finish_reason": finish,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
    }
    out["models"] = [m.id for m in client.models.list()]
    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=1)
    except openai.NotFoundError as e:
        out["unknown_model_status"] = e.status_code
    bad = [{"role": "user", "content": [
        {"type": "text", "text": prompt},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
    ]}]
    try:
        client.chat.completions.create(model=model, messages=bad, max_tokens=1)
    except openai.BadRequestError as e:
        out["bad_image_status"] = e.status_code
    print(json.dumps(out))


if __name__ == "__main__":
    main()
