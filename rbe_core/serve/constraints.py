"""Constrained decoding: ``response_format`` and ``tools`` as grammars that llguidance enforces.

llguidance (Microsoft's grammar engine behind Guidance, also used by llama.cpp and vLLM) compiles
JSON Schemas and Lark grammars against the model's own tokenizer and gives, at each step, the set
of token ids that keep the output inside the grammar; the worker masks every other logit before
sampling. It was picked over xgrammar because it needs no torch, builds a tokenizer's tables in
well under a second, and computes a mask in tens of microseconds on a CPU.

Tool calls use one format for every model: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
(the Hermes format that Qwen and SmolLM3 templates use). ``tool_choice`` decides the grammar:
``"auto"`` allows plain text or calls, ``"required"`` one call or more, a named function exactly
one call of it, ``"none"`` no grammar and no tools in the prompt.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
import weakref
from typing import Any

import attrs
import numpy as np

from .protocol import APIError

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
#: JSON written as ``json.dumps`` writes it (what models saw in training); llguidance's default
#: allows any run of whitespace between tokens, which a small model fills for as long as it may.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


@attrs.frozen
class OutputSpec:
    """What a chat's reply must be: ``grammar`` (llguidance's JSON form; None: free text) and the
    tools the prompt shows (empty: none); ``calls`` whether the reply is parsed for tool calls."""

    grammar: str | None = None
    tools: tuple[dict, ...] = ()
    calls: bool = False


def output_spec(response_format: dict | None, tools: list[dict] | None, tool_choice, parallel: bool) -> OutputSpec:
    """The ``OutputSpec`` of a chat request's ``response_format``, ``tools``, ``tool_choice`` and
    ``parallel_tool_calls``; a 400 naming the field for anything malformed or contradictory."""
    import llguidance

    functions = [_function(t, i) for i, t in enumerate(tools or [])]
    choice = tool_choice if tool_choice is not None else ("auto" if functions else "none")
    fmt = _response_schema(response_format)
    if choice == "none" or not functions:
        if isinstance(choice, dict) or choice == "required":
            raise APIError(400, "tool_choice names tools but the request has none", param="tool_choice")
        return OutputSpec(None if fmt is None else llguidance.LLMatcher.grammar_from_json_schema(fmt, JSON_STYLE))
    if fmt is not None:
        raise APIError(400, "response_format and tools cannot both shape one reply (set tool_choice to \"none\")",
                       param="response_format")
    names = [f["name"] for f in functions]
    if isinstance(choice, dict):
        chosen = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if chosen not in names:
            raise APIError(400, "tool_choice must name one of the tools", param="tool_choice")
        functions, parallel = [f for f in functions if f["name"] == chosen], False
    elif choice not in ("auto", "required"):
        raise APIError(400, "tool_choice is \"none\", \"auto\", \"required\" or a function", param="tool_choice")
    lark = _tools_lark(functions, free_text=choice == "auto", parallel=parallel)
    return OutputSpec(llguidance.LLMatcher.grammar_from_lark(lark), tuple(tools or ()), calls=True)


def _function(tool: dict, index: int) -> dict:
    """A tool's function (``name``, ``parameters`` as a JSON Schema; an object when left out)."""
    fn = tool.get("function") if tool.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
        raise APIError(400, f"tools.{index}: a function with a name of 1-64 letters, digits, _ or -",
                       param=f"tools.{index}")
    params = fn.get("parameters", {"type": "object"})
    if not isinstance(params, dict):
        raise APIError(400, f"tools.{index}.function.parameters must be a JSON Schema object",
                       param=f"tools.{index}")
    return {"name": name, "parameters": params}


def _response_schema(response_format: dict | None) -> dict | None:
    """The JSON Schema ``response_format`` asks for (None: plain text)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON Schema object",
                           param="response_format")
        return schema
    raise APIError(400, "response_format.type is \"text\", \"json_object\" or \"json_schema\"",
                   param="response_format")


def _tools_lark(functions: list[dict], *, free_text: bool, parallel: bool) -> str:
    """A Lark grammar for llguidance: one ``<tool_call>`` block (or several, ``parallel``) whose JSON
    names a function and gives arguments of its schema, or else (``free_text``) any text that does
    not start like a call."""
    call_schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                               "arguments": f["parameters"]},
                              "required": ["name", "arguments"], "additionalProperties": False}
                             for f in functions], "x-guidance": JSON_STYLE}
    lines = [f"calls: call{' (SEP call)*' if parallel else ''}",
             f'call: "{TOOL_OPEN}" SEP %json{json.dumps(call_schema)} SEP "{TOOL_CLOSE}"',
             "SEP: /[ \\n]{0,2}/"]
    if free_text:
        lines = ["start: TEXT | calls", f"TEXT: /(?s:.+)/ & ~/(?s:\\s*{re.escape(TOOL_OPEN)}.*)/", *lines]
    else:
        lines = ["start: calls", *lines]
    return "\n".join(lines) + "\n"


def check_grammar(grammar: str, lltok, param: str) -> None:
    """400 naming ``param`` when llguidance cannot compile ``grammar`` (e.g. a schema feature it lacks)."""
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
    if is_error:
        first = (messages[0] if messages else "invalid").splitlines()[0][:300]
        raise APIError(400, f"{param}: the grammar does not compile: {first}", param=param)


def tokenizer_for(model) -> Any:
    """llguidance's tables of ``model``'s tokenizer (built once per model: ~0.5 s for 50k tokens)."""
    import llguidance

    with _tokenizers_lock:
        found = _tokenizers.get(model)
        if found is None:
            tok = model._require_tokenizer()
            found = llguidance.LLTokenizer(tok.to_str(), n_vocab=int(model.config["vocab_size"]),
                                           eos_token=sorted(model.eos_ids))
            _tokenizers[model] = found
        return found


class Constraint:
    """One sequence's grammar state: ``mask`` the logits of its next token, ``accept`` the token
    sampled; ``finished`` once the grammar admits nothing more than the end."""

    def __init__(self, lltok, grammar: str):
        import llguidance

        self._matcher = llguidance.LLMatcher(lltok, grammar)
        self._bits = np.full((lltok.vocab_size + 31) // 32, -1, dtype=np.int32)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar forbids at -inf (in place)."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:logits.size].astype(bool)
        logits[~allowed] = -np.inf
        return logits

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        return self._matcher.is_stopped() or self._matcher.is_error()


_CALL_HEAD = re.compile(r'\s*' + re.escape(TOOL_OPEN) + r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*(?=\S)')
_CALL_TAIL = re.compile(r'\s*\}\s*' + re.escape(TOOL_CLOSE))


class CallStream:
    """A chat reply parsed for tool calls as it grows (the grammar of ``_tools_lark`` writes each
    call's name before its arguments). ``feed(piece)`` returns the content to send now and the
    ``tool_calls`` deltas ready, in OpenAI's stream shape: a call's ``id``, ``type`` and name with
    empty ``arguments`` once its head is complete, then pieces of its arguments' JSON text as the
    model writes them (their concatenation is the call's ``arguments``, byte for byte). A reply that
    may still become a call sends nothing; one that cannot is content throughout. ``finish()``:
    what was held back (text after the last complete call, or a call's head cut short, becomes
    content) and every call whole (``calls``)."""

    def __init__(self):
        self.text, self.pos, self.mode = "", 0, None  # mode: None (undecided), "text" or "calls"
        self.state = "head"  # in calls: "head", "arguments" (self.scan open) or "tail"
        self.scan: _ValueEnd | None = None
        self.calls: list[dict] = []

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        self.text += piece
        if self.mode is None:
            head = self.text.lstrip()
            if head.startswith(TOOL_OPEN):
                self.mode = "calls"
            elif not TOOL_OPEN.startswith(head):
                self.mode = "text"
        if self.mode == "text":
            out, self.pos = self.text[self.pos:], len(self.text)
            return out, []
        return "", self._parse() if self.mode == "calls" else []

    def finish(self) -> tuple[str | None, list[dict]]:
        """The content held back (None when none) and the last deltas."""
        deltas = self._parse() if self.mode == "calls" else []
        rest = self.text[self.pos:] if self.mode != "text" and self.state == "head" else ""
        self.pos = len(self.text)  # past a call's head, the rest is that call's (cut short)
        return (rest.strip() or None), deltas

    def _parse(self) -> list[dict]:
        deltas = []
        while True:
            if self.state == "head":
                m = _CALL_HEAD.match(self.text, self.pos)
                if not m:
                    return deltas
                self.pos, self.state, self.scan = m.end(), "arguments", _ValueEnd()
                call_id, name = "call_" + uuid.uuid4().hex[:24], m.group(1)
                self.calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": ""}})
                deltas.append({"index": len(self.calls) - 1, "id": call_id, "type": "function",
                               "function": {"name": name, "arguments": ""}})
            elif self.state == "arguments":
                used, ended = self.scan.feed(self.text, self.pos)
                if used:
                    deltas.append(self._arguments(self.text[self.pos:self.pos + used]))
                    self.pos += used
                if not ended:
                    return deltas
                self.state = "tail"
            else:
                m = _CALL_TAIL.match(self.text, self.pos)
                if not m:
                    return deltas
                self.pos, self.state = m.end(), "head"

    def _arguments(self, text: str) -> dict:
        self.calls[-1]["function"]["arguments"] += text
        return {"index": len(self.calls) - 1, "function": {"arguments": text}}


class _ValueEnd:
    """Where a JSON value written after a key ends: before the first ``,``, ``}`` or ``]`` outside
    strings at the depth it started at."""

    def __init__(self):
        self.depth, self.in_string, self.escaped = 0, False, False

    def feed(self, text: str, start: int) -> tuple[int, bool]:
        """How many characters of ``text[start:]`` belong to the value, and whether it ended there."""
        for i in range(start, len(text)):
            ch = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}],":
                if self.depth == 0:
                    return i - start, True
                if ch != ",":
                    self.depth -= 1
        return len(text) - start, False


def split_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """A whole reply's content (None when empty) and its tool calls, as ``CallStream`` parses it."""
    stream = CallStream()
    first, _ = stream.feed(text)
    rest, _ = stream.finish()
    content = (first + (rest or "")).strip()
    return (content or None), stream.calls


def tool_call_text(calls: list[dict]) -> str:
    """An assistant message's ``tool_calls`` written back as the blocks the model would produce."""
    blocks = []
    for call in calls:
        fn = call.get("function") or {}
        arguments = fn.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass
        blocks.append(f"{TOOL_OPEN}\n{json.dumps({'name': fn.get('name'), 'arguments': arguments})}\n{TOOL_CLOSE}")
    return "\n".join(blocks)
