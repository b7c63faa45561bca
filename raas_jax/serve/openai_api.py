"""OpenAI-compatible request parsing and response bodies (no HTTP here, no JAX): what `/v1/completions` and
`/v1/chat/completions` accept, and the JSON they answer with."""

from __future__ import annotations

import hashlib
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from raas_jax.serve.engine import RequestSettings

MAX_STOP_STRINGS = 16
# fields a client may send that this server does not implement: refused unless at their "off" value
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "tools": (None, []), "functions": (None, []), "logit_bias": (None, {}),
               "response_format": (None, {"type": "text"})}


class ApiError(Exception):
    """An error the client caused or must handle: the HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    prompt_ids: list[int]
    settings: RequestSettings
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    chat: bool
    return_token_ids: bool = False  # an extension (as vLLM's): the choices also carry the completion's token ids


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, name: str, default: float, low: float, high: float, *, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (open_low and value == low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ApiError(400, f"{name} must be a number in {bound}, got {value!r}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ApiError(400, f"{name} must be an integer {bound}, got {value!r}", param=name)
    return value


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {value!r}", param=name)
    return value


def seed_to_key(seed: int) -> int:
    """A client's 64-bit seed -> the 32-bit seed of the row's PRNG key (a hash: distinct seeds stay distinct)."""
    digest = hashlib.blake2b(int(seed).to_bytes(8, "little", signed=True), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def parse_request(body: Any, *, chat: bool, model_name: str, tokenizer: Any, max_model_len: int,
                  vocab_size: int) -> ParsedRequest:
    """Validate an OpenAI request body; raises ApiError (400 / 404) naming the field that is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", param="model",
                       code="model_not_found")
    for name, off in UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    n = _integer(body, "n", 1, 1)
    if n != 1:
        raise ApiError(400, f"n must be 1 (one completion per request), got {n}", param="n")
    prompt_ids = _chat_ids(body, tokenizer) if chat else _prompt_ids(body, tokenizer, vocab_size)
    room = max_model_len - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this server's limit is {max_model_len} "
                            "tokens for prompt + completion", param="messages" if chat else "prompt")
    max_tokens = _integer(body, "max_completion_tokens", None, 1) if chat else None
    max_tokens = _integer(body, "max_tokens", max_tokens, 1)
    if max_tokens is None:
        max_tokens = room
    temperature = _number(body, "temperature", 1.0, 0.0, 100.0)  # OpenAI's default: 1
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, open_low=True)
    top_k = _integer(body, "top_k", 0, -1)
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(32)
    elif not _is_int(seed) or not -(2**63) <= seed < 2**63:
        raise ApiError(400, f"seed must be a 64-bit integer, got {seed!r}", param="seed")
    else:
        seed = seed_to_key(seed)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_STRINGS:
        stop = tuple(stop)
    else:
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings", param="stop")
    if any(not s for s in stop):
        raise ApiError(400, "stop strings must not be empty", param="stop")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    include_usage = _bool(options or {}, "include_usage")
    settings = RequestSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
                               ignore_eos=_bool(body, "ignore_eos"))
    return ParsedRequest(prompt_ids, settings, seed, stop, stream, include_usage, chat,
                         _bool(body, "return_token_ids"))


def _prompt_ids(body: dict, tokenizer: Any, vocab_size: int) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    if isinstance(prompt, list) and prompt and all(_is_int(i) for i in prompt):
        bad = [i for i in prompt if not 0 <= i < vocab_size]
        if bad:
            raise ApiError(400, f"token ids must be in [0, {vocab_size}), got {bad[:5]}", param="prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "one prompt per request (send several requests)", param="prompt")
    raise ApiError(400, "prompt must be a non-empty string or a non-empty list of token ids", param="prompt")


def _chat_ids(body: dict, tokenizer: Any) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string role", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        plain.append({"role": m["role"], "content": content})
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
    try:
        ids = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # noqa: BLE001 - a template that rejects these messages (e.g. a role it does not know)
        raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


# ------------------------------------------------------------------------------------------- responses

def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, chat: bool, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int, token_ids: list[int] | None = None) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(rid: str, model: str, chat: bool, text: str | None, finish_reason: str | None, *,
               first: bool = False, usage_body: dict | None = None, token_ids: list[int] | None = None) -> dict:
    """One server-sent event of a stream; `text=None` with `usage_body`: the final usage chunk (no choices)."""
    if usage_body is not None:
        choices = []
    elif chat:
        delta = ({"role": "assistant", "content": text} if first else {"content": text}) if text is not None else {}
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    if token_ids is not None and choices:
        choices[0]["token_ids"] = token_ids
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices}
    if usage_body is not None:
        body["usage"] = usage_body
    return body
