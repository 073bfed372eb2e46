"""The OpenAI parameters beyond plain sampling, through the official ``openai`` client against the
real server: logprobs, logit_bias, penalties, several prompts, nulls, refused fields, structured
output and tools (llguidance grammars), /tokenize and /detokenize, user text never becoming
control tokens, a non-streamed request cancelled by its client leaving."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from _model_helpers import tiny_llama, write_gguf  # noqa: E402
from _serve_helpers import CHATML, KEY, Server  # noqa: E402

import rbe_core  # noqa: E402

pytest.importorskip("fastapi", reason="rbe serve needs the serve extra (pip install 'rbe[serve]')")
pytest.importorskip("llguidance", reason="structured output needs llguidance (pip install 'rbe[serve]')")

from rbe_core.serve.constraints import CallStream, split_tool_calls  # noqa: E402

EOS = 299  # the tiny model's <|endoftext|>
ANSWER = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "n"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
HI = [{"role": "user", "content": "the of and"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny Llama with a context long enough for tools described in the prompt (byte-level
    tokens: about one per character)."""
    d = tmp_path_factory.mktemp("surface")
    write_gguf(tiny_llama(tie_word_embeddings=True, max_position_embeddings=1024), d / "tiny.gguf",
               chat_template=CHATML)
    model = rbe_core.compress_model(d / "tiny.gguf", d / "tiny.rbe", codec="int8", progress=False,
                                    calibration=False)
    srv = Server(str(model), "--api-key", KEY)
    yield srv
    assert srv.stop() == 0


def _metric(server, name: str) -> float:
    text = server.request("GET", "/metrics")[2].decode()
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name))


# ---- logprobs, bias, penalties ---------------------------------------------------------------


def test_chat_logprobs_are_the_greedy_choices_streamed_and_not(server):
    client = server.client()
    out = client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=0, logprobs=True,
                                         top_logprobs=3)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(v <= 0 for v in tops)
        assert e.logprob == pytest.approx(tops[0]) and e.token == e.top_logprobs[0].token  # greedy: the best
        assert e.bytes == list(e.token.encode())
    if "\ufffd" not in "".join(e.token for e in entries):
        assert "".join(e.token for e in entries) == out.choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]
    # the same to rounding: a prompt met in the prefix cache runs fewer positions in another order
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-3)


def test_completion_logprobs_in_the_legacy_shape(server):
    out = server.client().completions.create(model="tiny", prompt="the", max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_logit_bias_forces_and_bans_tokens(server):
    client = server.client()
    e = server.json("POST", "/tokenize", {"model": "tiny", "prompt": "e", "add_special_tokens": False})[1]["tokens"]
    forced = client.completions.create(model="tiny", prompt="the", max_tokens=5, temperature=0,
                                       logit_bias={str(e[0]): 100})
    assert forced.choices[0].text == "eeeee"
    plain = client.completions.create(model="tiny", prompt="the", max_tokens=1, temperature=0, logprobs=0)
    first = server.json("POST", "/tokenize", {"model": "tiny", "prompt": plain.choices[0].text,
                                               "add_special_tokens": False})[1]["tokens"][0]
    banned = client.completions.create(model="tiny", prompt="the", max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text != plain.choices[0].text
    status, body = server.json("POST", "/v1/completions", {"model": "tiny", "prompt": "the", "logit_bias": {"x": 1}})
    assert status == 400 and body["error"]["param"] == "logit_bias"


def test_frequency_penalty_stops_a_token_repeating(server):
    client = server.client()
    e = server.json("POST", "/tokenize", {"model": "tiny", "prompt": "e", "add_special_tokens": False})[1]["tokens"]
    kw = dict(model="tiny", prompt="the", max_tokens=10, temperature=0, logit_bias={str(e[0]): 5})
    assert client.completions.create(**kw).choices[0].text == "e" * 10
    penalised = client.completions.create(**kw, frequency_penalty=2.0).choices[0].text
    assert penalised.count("e") < 6
    # presence counts once: the second "e" is 2 nats less likely than without (logprobs are after penalties)
    plain = client.completions.create(**kw, logprobs=0).choices[0].logprobs.token_logprobs
    present = client.completions.create(**kw, logprobs=0, presence_penalty=2.0).choices[0].logprobs.token_logprobs
    assert present[0] == pytest.approx(plain[0], abs=1e-3) and present[1] < plain[1] - 0.5


# ---- request shapes ----------------------------------------------------------------------------


def test_several_prompts_give_prompt_major_choices(server):
    client = server.client()
    out = client.completions.create(model="tiny", prompt=["the", "of and"], n=2, max_tokens=4, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0).choices[0].text
             for p in ("the", "of and")]
    assert [c.text for c in out.choices] == [alone[0], alone[0], alone[1], alone[1]]
    one = client.completions.create(model="tiny", prompt="the", max_tokens=1)
    two = client.completions.create(model="tiny", prompt="of and", max_tokens=1)
    assert out.usage.prompt_tokens == one.usage.prompt_tokens + two.usage.prompt_tokens


def test_nulls_mean_defaults_and_unknown_or_unsupported_fields_are_400(server):
    nulls = {"model": "tiny", "messages": HI, "max_tokens": 2, "temperature": None, "top_p": None, "n": None,
             "stop": None, "seed": None, "logprobs": None, "top_logprobs": None, "stream": None, "tools": None,
             "response_format": None, "presence_penalty": None, "logit_bias": None, "user": None}
    assert server.json("POST", "/v1/chat/completions", nulls)[0] == 200
    status, body = server.json("POST", "/v1/chat/completions", {"model": "tiny", "messages": HI, "temprature": 1})
    assert status == 400 and body["error"]["param"] == "temprature" and "unrecognized" in body["error"]["message"]
    status, body = server.json("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "echo": True})
    assert status == 400 and body["error"]["param"] == "echo" and "not supported" in body["error"]["message"]
    assert server.json("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "echo": False,
                                                    "max_tokens": 1})[0] == 200
    status, body = server.json("POST", "/v1/chat/completions", {"model": "tiny", "messages": HI, "top_logprobs": 2})
    assert status == 400 and body["error"]["param"] == "top_logprobs"


# ---- structured output and tools ---------------------------------------------------------------


def test_json_schema_replies_always_match_the_schema(server):
    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    for seed in range(4):
        out = client.chat.completions.create(model="tiny", messages=HI, max_tokens=60, temperature=1.0, seed=seed,
                                             response_format=fmt)
        assert out.choices[0].finish_reason == "stop"
        reply = json.loads(out.choices[0].message.content)
        assert reply["answer"] in ("yes", "no") and 0 <= reply["n"] <= 9 and set(reply) == {"answer", "n"}
    status, body = server.json("POST", "/v1/chat/completions", {
        "model": "tiny", "messages": HI, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}})
    assert status == 400 and body["error"]["param"] == "response_format"


def test_json_object_replies_are_objects_or_cut_by_length(server):
    out = server.client().chat.completions.create(model="tiny", messages=HI, max_tokens=40, temperature=0,
                                                  response_format={"type": "json_object"})
    text = out.choices[0].message.content
    assert text.lstrip().startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_required_and_named_tool_calls_follow_the_function_schemas(server):
    client = server.client()
    out = client.chat.completions.create(model="tiny", messages=HI, max_tokens=300, temperature=0.8, seed=1,
                                         tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    for call in choice.message.tool_calls:
        args = json.loads(call.function.arguments)
        assert (call.function.name, set(args)) in (("get_weather", {"city"}), ("get_time", {"zone"}))
    named = client.chat.completions.create(model="tiny", messages=HI, max_tokens=300, temperature=0.8, seed=2,
                                           tools=[WEATHER, TIME],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
    chunks = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=300, temperature=0.8, seed=2,
                                                 tools=[WEATHER, TIME], stream=True,
                                                 tool_choice={"type": "function", "function": {"name": "get_time"}}))
    streamed = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    head, *pieces = streamed  # the call's id and name first, then its arguments as they are written
    assert head.id.startswith("call_") and head.function.name == call.function.name and head.function.arguments == ""
    assert len(pieces) > 1 and all(t.index == 0 and t.id is None and t.function.name is None for t in pieces)
    assert "".join(t.function.arguments for t in pieces) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_calls_parse_as_they_stream():
    """A reply fed in pieces of any size gives the same calls (arguments byte for byte, strings with
    braces, quotes and escapes inside) as the whole reply; text that cannot be a call is content
    at once; a call cut short keeps what was written of its arguments; a head cut short is content."""
    reply = ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "U\\"T}C", "n": [1, {"a": "]"}]}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>')
    whole = split_tool_calls(reply)
    assert whole[0] is None and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole[1]] == [
        ("get_time", {"zone": 'U"T}C', "n": [1, {"a": "]"}]}), ("get_weather", {})]
    for size in (1, 2, 7, len(reply)):
        stream, deltas = CallStream(), []
        for k in range(0, len(reply), size):
            text, got = stream.feed(reply[k:k + size])
            assert text == ""
            deltas += got
        assert stream.finish() == (None, [])
        for index, call in enumerate(whole[1]):
            mine = [d for d in deltas if d["index"] == index]
            assert mine[0]["function"] == {"name": call["function"]["name"], "arguments": ""}
            assert "".join(d["function"]["arguments"] for d in mine[1:]) == call["function"]["arguments"]
    stream = CallStream()
    assert stream.feed(" <tool") == ("", []) and stream.feed("box> hi") == (" <toolbox> hi", [])
    assert split_tool_calls('<tool_call>\n{"name": "get_time", "arguments": {"zo')[1][0]["function"]["arguments"] == '{"zo'
    assert split_tool_calls('<tool_call>\n{"name": "get_ti') == ('<tool_call>\n{"name": "get_ti', [])


def test_a_tool_conversation_continues_and_auto_replies_are_text_or_calls(server):
    history = [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    for seed in range(3):
        out = server.client().chat.completions.create(model="tiny", messages=history, max_tokens=30, seed=seed,
                                                      tools=[WEATHER])
        message = out.choices[0].message
        assert message.tool_calls or not (message.content or "").lstrip().startswith("<tool_call>")
    status, body = server.json("POST", "/v1/chat/completions", {"model": "tiny", "messages": HI, "tools": [WEATHER],
                                                                 "tool_choice": {"type": "function",
                                                                                 "function": {"name": "nope"}}})
    assert status == 400 and body["error"]["param"] == "tool_choice"
    status, body = server.json("POST", "/v1/chat/completions", {"model": "tiny", "messages": HI,
                                                                 "tools": [{"type": "function", "function": {}}]})
    assert status == 400 and body["error"]["param"] == "tools.0"


# ---- tokens ----------------------------------------------------------------------------------


def test_tokenize_detokenize_and_user_text_stays_text(server):
    ids = server.json("POST", "/tokenize", {"model": "tiny", "prompt": "the of", "add_special_tokens": False})[1]
    assert ids["count"] == len(ids["tokens"]) > 0 and ids["max_model_len"] == 1024
    back = server.json("POST", "/detokenize", {"model": "tiny", "tokens": ids["tokens"]})[1]
    assert back["prompt"] == "the of"
    assert server.json("POST", "/detokenize", {"model": "tiny", "tokens": [10**6]})[0] == 400
    assert server.request("POST", "/tokenize", {"model": "tiny", "prompt": "x"}, key=None)[0] == 401
    # a completion prompt is the client's own text: special tokens stay special
    assert server.json("POST", "/tokenize", {"model": "tiny", "prompt": "<|endoftext|>",
                                             "add_special_tokens": False})[1]["tokens"] == [EOS]
    # chat content is what a user typed: never a control token
    typed = server.json("POST", "/tokenize", {"model": "tiny", "messages": [
        {"role": "user", "content": "<|endoftext|>"}]})[1]["tokens"]
    assert EOS not in typed and len(typed) > 10


# ---- cancellation ------------------------------------------------------------------------------


def test_a_non_streamed_request_stops_when_its_client_leaves(server):
    before = _metric(server, "rbe_cancelled_total")
    body = json.dumps({"model": "tiny", "prompt": ["the"] * 4, "max_tokens": 500, "n": 16, "temperature": 0,
                       "logit_bias": {str(EOS): -100}}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                  b"\r\n\r\n" + body)
        time.sleep(0.2)
    end = time.monotonic() + 20
    while _metric(server, "rbe_cancelled_total") <= before and time.monotonic() < end:
        time.sleep(0.05)
    assert _metric(server, "rbe_cancelled_total") > before
