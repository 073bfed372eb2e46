"""The OpenAI wire protocol: request bodies (validated, unknown fields accepted) and errors.

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


class APIError(Exception):
    """An error answered in the OpenAI shape with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # "5" is not a number, 3.0 not a count


class Sampling(_Request):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "'stop' takes up to 4 non-empty strings", param="stop")
        return stops

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int]

    def prompts(self) -> list[str | list[int]]:
        """One prompt (text or token ids); a list of several texts is refused (one per request)."""
        p = self.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise APIError(400, "send one prompt per request", param="prompt")
            return [p[0]]
        if isinstance(p, list) and not p:
            raise APIError(400, "'prompt' is empty", param="prompt")
        return [p]


class Message(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

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


class EmbeddingRequest(_Request):
    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=1 << 16)

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if len(texts) > 2048 or any(not t for t in texts):
            raise APIError(400, "'input' takes 1..2048 non-empty strings", param="input")
        return texts


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
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or None
        raise APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where) from None


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
