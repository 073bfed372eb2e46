"""Chat prompts: messages (and tools) through the model's chat template into token ids.

What users wrote is tokenized as text: each message's content enters the template as a marker
no user can guess, and the pieces between markers (the template's own control tokens) and the
contents are tokenized apart, the contents with special tokens read as plain text. So a
``<|im_end|>`` typed into a message can never close the turn. Completion prompts are the
client's whole prompt and keep special tokens.

A template that ignores ``tools`` (the output does not change with them) gets them described
in a system message instead, with the ``<tool_call>`` format of ``constraints``.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
import weakref

from .constraints import TOOL_CLOSE, TOOL_OPEN, tool_call_text
from .protocol import APIError, Message

_plain_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_plain_lock = threading.Lock()


def chat_ids(served, messages: list[Message], tools: tuple[dict, ...] = ()) -> list[int]:
    """The token ids of ``messages`` through ``served``'s chat template, ready for the reply
    (400 ``messages`` if the template refuses them or they come out empty)."""
    marker = uuid.uuid4().hex
    native_tools = bool(tools) and _render(served, [{"role": "user", "content": ""}], tools) != \
        _render(served, [{"role": "user", "content": ""}], ())
    turns, contents = [], []
    for m in messages:
        turn, text = _turn(m, native_tools)
        turn["content"] = f"\ue000{marker}{len(contents)}\ue001"
        contents.append(text)
        turns.append(turn)
    if tools and not native_tools:
        turns, contents = _with_tools_described(turns, contents, tools, marker)
    rendered = _render(served, turns, tools if native_tools else ())
    pieces = re.split(f"\ue000{marker}(\\d+)\ue001", rendered)
    template_tok, text_tok = served.model._require_tokenizer(), plain_tokenizer(served.model)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i % 2:
            ids += text_tok.encode(contents[int(piece)], add_special_tokens=False).ids
        elif piece:
            ids += template_tok.encode(piece, add_special_tokens=False).ids
    if not ids:
        raise APIError(400, "the messages are empty", param="messages")
    return ids


def plain_tokenizer(model):
    """A copy of ``model``'s tokenizer that reads special tokens' text as text (one per model)."""
    with _plain_lock:
        found = _plain_tokenizers.get(model)
        if found is None:
            from tokenizers import Tokenizer

            found = Tokenizer.from_str(model._require_tokenizer().to_str())
            found.encode_special_tokens = True
            _plain_tokenizers[model] = found
        return found


def _turn(m: Message, native_tools: bool) -> tuple[dict, str]:
    """A message as the template sees it (content set by the caller) and its text. Without a
    template that knows tools, calls become ``<tool_call>`` text and results a user turn."""
    text = m.text()
    turn: dict = {"role": m.role}
    if m.name is not None:
        turn["name"] = m.name
    if native_tools:
        if m.tool_calls:
            turn["tool_calls"] = [_parsed_arguments(c) for c in m.tool_calls]
        if m.tool_call_id is not None:
            turn["tool_call_id"] = m.tool_call_id
    elif m.tool_calls:
        text = "\n".join(t for t in (text, tool_call_text(m.tool_calls)) if t)
    elif m.role == "tool":
        turn["role"], text = "user", f"<tool_response>\n{text}\n</tool_response>"
    return turn, text


def _parsed_arguments(call: dict) -> dict:
    """A tool call with its ``arguments`` as an object (templates write them with ``tojson``)."""
    fn = dict(call.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except ValueError:
            pass
    return {**call, "function": fn}


def _with_tools_described(turns: list[dict], contents: list[str], tools: tuple[dict, ...], marker: str):
    """``turns`` with the tools described at the start of the first system message (one is
    added when there is none)."""
    described = ("You can call these functions (JSON Schema):\n" + "\n".join(json.dumps(t) for t in tools) +
                 f"\nTo call functions, reply with {TOOL_OPEN}{{\"name\": NAME, \"arguments\": {{...}}}}{TOOL_CLOSE} "
                 "blocks, one per call.")
    if turns and turns[0]["role"] in ("system", "developer"):
        contents = [described + "\n\n" + contents[0], *contents[1:]]
        return turns, contents
    first = {"role": "system", "content": f"\ue000{marker}{len(contents)}\ue001"}
    return [first, *turns], [*contents, described]


def _render(served, turns: list[dict], tools: tuple[dict, ...]) -> str:
    """The template's text for ``turns`` (and ``tools`` when given), with the generation prompt."""
    tok = served.model._require_tokenizer()
    cfg = served.model.config

    def special(key):
        ids = cfg.get(key)
        ids = ids[0] if isinstance(ids, list) and ids else ids
        return tok.id_to_token(ids) if isinstance(ids, int) else ""

    try:
        return served.template.render(messages=turns, tools=list(tools) or None, add_generation_prompt=True,
                                      bos_token=special("bos_token_id"), eos_token=special("eos_token_id"))
    except Exception as exc:  # noqa: BLE001 - the template's own errors (e.g. raise_exception)
        raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
