"""The OpenAI wire protocol: request bodies (validated; ``null`` is a field's default; a field
not implemented or unknown is refused) and errors.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with its
HTTP status (``APIError``); a body that is not JSON or whose fields have the wrong types is a
400 naming the field, never a 500.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

#: Largest values the server takes for numeric fields (beyond: a 400, before any work).
MAX_TOKENS_LIMIT = 1 << 20
MAX_N = 16
#: choices a completions request may ask for in all (prompts x n)
MAX_PROMPTS = 64


class APIError(Exception):
    """An error answered in the OpenAI shape with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


#: OpenAI request fields rbe serve does not implement: a request that sets one (to anything but
#: the value given, which means "off") is a 400 naming it, never silently ignored.
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "echo": (False, "the prompt is not echoed"),
    "suffix": (None, "no fill-in-the-middle"),
    "best_of": (1, "use n"),
    "functions": (None, "use tools"),
    "function_call": (None, "use tool_choice"),
    "audio": (None, "text only"),
    "modalities": (["text"], "text only"),
    "prediction": (None, "no predicted outputs"),
    "web_search_options": (None, "no web search"),
    "reasoning_effort": (None, "the models served are not reasoning models"),
    "verbosity": (None, "the models served are not reasoning models"),
    "store": (False, "completions are not stored"),
}


class _Request(BaseModel):
    """Strict types ("5" is not a number, 3.0 not a count); ``null`` means "the default", as in
    OpenAI's API; fields it does not know are kept in ``model_extra`` for ``parse`` to refuse."""

    model_config = ConfigDict(extra="allow", strict=True)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class Sampling(_Request):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0, le=MAX_TOKENS_LIMIT)  # an extension (vLLM, llama-server): 0 = off
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=1024)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = Field(default=None, max_length=512)  # an end user's id: logged nowhere, changes nothing
    metadata: dict[str, str] | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "'stop' takes up to 4 non-empty strings", param="stop")
        return stops

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def biases(self, vocab: int) -> dict[int, float]:
        """``logit_bias`` as token id -> bias; 400 for a key that is no token id below ``vocab``
        or a bias outside [-100, 100]."""
        out = {}
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) < 12 and int(key) < vocab):
                raise APIError(400, f"logit_bias: {key[:20]!r} is not a token id below {vocab}", param="logit_bias")
            if not -100.0 <= bias <= 100.0:
                raise APIError(400, "logit_bias values lie in [-100, 100]", param="logit_bias")
            out[int(key)] = bias
        return out


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one text, one list of token ids, or a list of either (at most ``MAX_PROMPTS``)."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
            return [p]
        if not p:
            raise APIError(400, "'prompt' is empty", param="prompt")
        if len(p) * self.n > MAX_PROMPTS:
            raise APIError(400, f"prompts x n is over {MAX_PROMPTS}", param="prompt")
        return list(p)

    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives each token's logprobs list (None: no logprobs)."""
        return self.logprobs


class Message(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = Field(default=None, max_length=256)

    def text(self) -> str:
        """The message's text (content parts of type "text" joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    def top_logprobs_wanted(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class EmbeddingRequest(_Request):
    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=1 << 16)
    user: str | None = Field(default=None, max_length=512)

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if len(texts) > 2048 or any(not t for t in texts):
            raise APIError(400, "'input' takes 1..2048 non-empty strings", param="input")
        return texts


class TokenizeRequest(_Request):
    """``POST /tokenize``: a text (``prompt``) or chat ``messages`` (through the chat template)."""

    model: str
    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True


class DetokenizeRequest(_Request):
    model: str
    tokens: list[int] = Field(max_length=MAX_TOKENS_LIMIT)


class LoadRequest(_Request):
    path: str
    name: str | None = Field(default=None, min_length=1, max_length=200)


class UnloadRequest(_Request):
    model: str


def parse(model: type[BaseModel], raw: bytes):
    """``raw`` (a request body) as ``model``; ``APIError`` 400 naming the first bad field."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body nests too deeply") from None
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of over 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    _check_text(data)
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or None
        raise APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where) from None
    _refuse_extras(req)
    return req


def _refuse_extras(req: BaseModel) -> None:
    """400 for a field the request model does not declare: OpenAI's that rbe does not implement
    (``UNSUPPORTED``, unless set to its "off" value) say why; any other is unrecognized."""
    for name, value in (req.model_extra or {}).items():
        if name in UNSUPPORTED:
            off, why = UNSUPPORTED[name]
            if value is not None and value != off:
                raise APIError(400, f"'{name}' is not supported by rbe serve ({why})", param=name)
        else:
            raise APIError(400, f"unrecognized request argument: '{name[:64]}'", param=name[:64])


def _check_text(data, where: str = "body") -> None:
    """400 for a string holding a lone surrogate (valid JSON escapes, but no text: no tokenizer
    or encoder takes it), naming where it is."""
    stack = [(data, where)]
    while stack:
        value, at = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"{at}: a lone UTF-16 surrogate is not text", param=at) from None
        elif isinstance(value, dict):
            stack.extend((v, f"{at}.{k}" if at != "body" else str(k)) for k, v in value.items())
            stack.extend((k, at) for k in value)
        elif isinstance(value, list):
            stack.extend((v, f"{at}.{i}") for i, v in enumerate(value))
