"""The OpenAI API's request fields, validated, and its response objects.

Requests are checked by hand rather than by pydantic models so that every rejection is the
API's own 400 `{"error": {"message", "type", "param", "code"}}` naming the offending field, not a
framework's 422. What is accepted: `model`, `prompt` (a string, a list of token ids, or a list of
one string) or `messages` (role and content, content as a string or a list of text parts),
`max_tokens` (`max_completion_tokens` for chat), `temperature`, `top_p`, `top_k`, `seed`, `stop`,
`stream`, `stream_options.include_usage`, `n` = 1; and, as vLLM does, `ignore_eos` and
`chat_template_kwargs`. Sampling options this server cannot honour (`logprobs`, `echo`, `n` > 1,
`best_of` > 1, non-zero penalties) are refused rather than silently ignored.

Defaults follow the API: temperature 1; max_tokens 16 for completions and the rest of the
context for chat. A prompt that leaves no room in the context, or a max_tokens that does not fit
beside it, is a 400 (the API does not truncate silently).
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid

from dsv3_jax.serve.scheduler import Params

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An error response: HTTP status and the OpenAI error object."""

    def __init__(self, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.type, self.status, self.code = message, param, type, status, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Parsed:
    """A validated generation request (the prompt still as the client gave it)."""

    chat: bool
    params: Params | None  # filled in once the prompt is tokenised
    stream: bool
    include_usage: bool
    max_tokens: int | None  # None: the API's default
    prompt: object  # the `prompt` or `messages` field
    template_kwargs: dict


# ---- field checks -----------------------------------------------------------------------------------------
def _number(body: dict, name: str, default: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise APIError(f"'{name}' must be a number, got {type(v).__name__}", param=name)
    if not math.isfinite(v):
        raise APIError(f"'{name}' must be a finite number, got {v}", param=name)
    return float(v)


def _integer(body: dict, name: str, default: int | None) -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(f"'{name}' must be an integer, got {type(v).__name__}", param=name)
    return v


def _flag(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(f"'{name}' must be true or false, got {type(v).__name__}", param=name)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    stops = [] if v is None else [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError("'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(f"'stop' has {len(stops)} strings; at most {MAX_STOP_STRINGS}", param="stop")
    return tuple(s for s in stops if s)


def _refuse_unsupported(body: dict) -> None:
    if _integer(body, "n", 1) != 1:
        raise APIError("only n = 1 is supported: send one request per completion", param="n")
    if _integer(body, "best_of", 1) not in (None, 1):
        raise APIError("best_of is not supported", param="best_of")
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias"):
        if body.get(name) not in (None, False, 0, [], {}):
            raise APIError(f"'{name}' is not supported by this server", param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0) != 0.0:
            raise APIError(f"'{name}' is not supported by this server (only 0)", param=name)


def parse(body, *, chat: bool, model_name: str) -> Parsed:
    """Check every field but the prompt's tokens (which need the tokenizer) -> Parsed."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise APIError("'model' is required", param="model")
    if model != model_name:
        raise APIError(f"the model '{model}' does not exist; this server serves '{model_name}'", param="model",
                       code="model_not_found")
    field = "messages" if chat else "prompt"
    if body.get(field) is None:
        raise APIError(f"'{field}' is required", param=field)
    _refuse_unsupported(body)
    max_tokens = _integer(body, "max_completion_tokens", None) if chat else None
    max_tokens = _integer(body, "max_tokens", max_tokens)
    if max_tokens is not None and max_tokens < 1:
        raise APIError(f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise APIError(f"'temperature' must be >= 0, got {temperature}", param="temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise APIError(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    top_k = _integer(body, "top_k", 0)
    if top_k < -1:
        raise APIError(f"'top_k' must be >= 0 (0 or -1: off), got {top_k}", param="top_k")
    seed = _integer(body, "seed", None)
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError("'stream_options' must be an object", param="stream_options")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise APIError("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    params = Params(prompt=[], max_tokens=0, temperature=temperature, top_k=max(top_k, 0), top_p=top_p, seed=seed,
                    stop=_stop(body), ignore_eos=_flag(body, "ignore_eos"))
    return Parsed(chat, params, stream, stream and _flag(options, "include_usage"), max_tokens, body[field], kwargs)


# ---- prompts ------------------------------------------------------------------------------------------------
def completion_ids(prompt, tokenizer) -> list[int]:
    """`prompt`: a string (BOS as the tokenizer's add_bos_token says), token ids, or [one string]."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt) if prompt else []
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise APIError("'prompt' must be a string or a list of token ids (batches of prompts are not supported: "
                   "send one request each)", param="prompt")


def chat_messages(messages) -> list[dict]:
    """`messages` -> [{"role", "content": str}] (text parts of list contents joined)."""
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(f"messages[{i}] must be an object with a 'role' string", param=f"messages[{i}]")
        content = m.get("content")
        if content is None:  # an assistant turn with only tool calls, say
            content = ""
        elif isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(f"messages[{i}].content: only text parts are supported", param=f"messages[{i}]")
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise APIError(f"messages[{i}].content must be a string or a list of text parts",
                           param=f"messages[{i}]")
        out.append({**{k: v for k, v in m.items() if k != "content"}, "content": content})
    return out


def finish_params(parsed: Parsed, ids: list[int], *, vocab_size: int, context: int) -> Params:
    """The prompt's ids checked against the model (non-empty, in the vocabulary, inside the context)."""
    field = "messages" if parsed.chat else "prompt"
    if not ids:
        raise APIError(f"'{field}' is empty: generation needs at least one token", param=field)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(f"token ids {bad[:5]} are outside the model's vocabulary [0, {vocab_size})", param=field)
    if len(ids) >= context:
        raise APIError(f"this model's context is {context} tokens and the {field} has {len(ids)}: no room "
                       "to generate", param=field, code="context_length_exceeded")
    max_tokens = parsed.max_tokens
    if max_tokens is None:
        max_tokens = context - len(ids) if parsed.chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS, context - len(ids))
    elif len(ids) + max_tokens > context:
        raise APIError(f"this model's context is {context} tokens; the {field} has {len(ids)} and max_tokens "
                       f"asks for {max_tokens} more", param="max_tokens", code="context_length_exceeded")
    return dataclasses.replace(parsed.params, prompt=ids, max_tokens=max_tokens)


# ---- responses ------------------------------------------------------------------------------------------
class Reply:
    """Builds the response objects of one request (ids and timestamps shared by its chunks)."""

    def __init__(self, parsed: Parsed, model: str):
        self.chat, self.model = parsed.chat, model
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _object(self, kind: str, choice: dict, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice],
                **extra}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens}}

    def complete(self, text: str, finish_reason: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return self._object("chat.completion", choice, usage=usage)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._object("text_completion", choice, usage=usage)

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False,
              include_usage: bool = False) -> dict:
        """One streamed chunk (`usage: null` on each when the final usage chunk will follow)."""
        extra = {"usage": None} if include_usage else {}
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._object("chat.completion.chunk", choice, **extra)
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._object("text_completion", choice, **extra)

    def usage_chunk(self, usage: dict) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [],
                "usage": usage}
