"""The tokenizer embedded in a llama.cpp GGUF as a ``tokenizers`` JSON (``gguf_tokenizer_json``):
SentencePiece vocabularies against sentencepiece itself, byte-level BPE split as llama.cpp splits for
each ``tokenizer.ggml.pre``, and one-line errors for what is not supported."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helpers importable
from _model_helpers import byte_level_vocab  # noqa: E402

from rbe_core.models import ModelError  # noqa: E402
from rbe_core.models.sources import gguf_metadata, gguf_tokenizer_json  # noqa: E402

tokenizers = pytest.importorskip("tokenizers")
CALIBRATION = Path(__file__).parents[2] / "rbe_core" / "data" / "calibration.txt"

# -- SentencePiece ("llama") ------------------------------------------------------------------------

#: convert_hf_to_gguf's SentencePieceTokenTypes
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple    inner   spaces and a\ttab",
    " ",
    "",
    "digits 12345 and 3.14159, 2024-01-02",
    "line one\nline two\n\n\tindented\r\nwindows",
    "naïve café — Ünïcödé ✓ 日本語 🦙 ∑ € ß",
    "def parse_args(argv=None):\n    return parser.parse_args(argv)\n",
    "I've been told he'll say it's 'quoted' \"twice\"",
]


def _sentencepiece_model(add_dummy_prefix: bool):
    try:
        import sentencepiece as spm
    except ImportError as exc:  # not installed, or a wheel that does not load here
        pytest.skip(f"sentencepiece cannot be imported: {exc}")
    lines = [line for line in CALIBRATION.read_text(encoding="utf-8").splitlines() if line.strip()]
    proto = io.BytesIO()
    # Llama's settings: BPE, byte fallback, no normalization besides spaces -> "▁", whitespace-only pieces
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, model_type="bpe", vocab_size=1000, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=add_dummy_prefix,
        allow_whitespace_only_pieces=True, character_coverage=1.0, split_digits=False, num_threads=1,
        minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=proto.getvalue())


def _write_spm_gguf(sp, path: Path, arch: str, *, add_space_prefix: bool | None, extra_user_defined=(),
                    add_bos: bool | None = None, add_eos: bool | None = None) -> dict:
    """The GGUF convert_hf_to_gguf's ``_set_vocab_sentencepiece`` writes (tokens, scores, token types,
    added tokens as user-defined with score -1000, the special ids), tokenizer keys only."""
    gguf = pytest.importorskip("gguf")
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else UNUSED if sp.is_unused(i)
                     else BYTE if sp.is_byte(i) else NORMAL)
    for token in extra_user_defined:
        tokens.append(token)
        scores.append(-1000.0)
        types.append(USER_DEFINED)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)
    if add_space_prefix is not None:  # Gemma's converter writes False; Llama's nothing (llama.cpp: true)
        w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf_metadata(gguf.GGUFReader(str(path)))


@pytest.mark.parametrize("arch, prefix", [("llama", True), ("gemma3", False)])
def test_sentencepiece_matches_sentencepiece(tmp_path, arch, prefix):
    sp = _sentencepiece_model(add_dummy_prefix=prefix)
    kv = _write_spm_gguf(sp, tmp_path / "v.gguf", arch, add_space_prefix=None if prefix else False)
    tok = tokenizers.Tokenizer.from_str(gguf_tokenizer_json(kv))
    assert tok.get_vocab_size() == sp.get_piece_size()
    corpus = [line for line in CALIBRATION.read_text(encoding="utf-8").splitlines()[:200] if line.strip()]
    for text in TEXTS + corpus:
        want = sp.encode(text)
        got = tok.encode(text, add_special_tokens=False).ids
        assert got == want, (text, tok.encode(text, add_special_tokens=False).tokens, sp.encode(text, out_type=str))
        assert tok.decode(got) == sp.decode(want) == text
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        assert tok.encode(text).ids == [sp.bos_id()] + want
        assert tok.decode(tok.encode(text).ids) == text  # BOS skipped, then the prefix space stripped
    assert any(sp.is_byte(i) for i in tok.encode("🦙 ∑").ids)  # byte fallback was exercised


def test_sentencepiece_flags_and_added_tokens(tmp_path):
    sp = _sentencepiece_model(add_dummy_prefix=True)
    kv = _write_spm_gguf(sp, tmp_path / "v.gguf", "llama", add_space_prefix=None, add_bos=False, add_eos=True,
                         extra_user_defined=["<tool_call>"])
    tok = tokenizers.Tokenizer.from_str(gguf_tokenizer_json(kv))
    tool = sp.get_piece_size()
    assert tok.encode("Hello").ids == sp.encode("Hello") + [sp.eos_id()]
    # user-defined tokens are matched whole in the raw text; like llama.cpp, the text after one gets the
    # prefix space again, as after a control token
    assert tok.encode("a<tool_call>b", add_special_tokens=False).ids == sp.encode("a") + [tool] + sp.encode("b")
    assert tok.encode("</s>", add_special_tokens=False).ids == [sp.eos_id()]
    ids = tok.encode("x</s>", add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=True) == "x"
    assert "<tool_call>" in tok.decode([tool], skip_special_tokens=True)  # user-defined: not special


def test_sentencepiece_scales_to_a_large_vocabulary():
    """Gemma's 256k vocabulary: the merges come from the vocabulary in a few seconds."""
    import itertools
    import random
    import time

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrst\u2581"
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["".join(p) for n in (1, 2, 3) for p in itertools.product(letters, repeat=n)]
    seen = set(tokens)
    while len(tokens) < 256000:
        piece = "".join(rng.choices(letters, k=rng.randrange(4, 11)))
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
    n = len(tokens)
    kv = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "general.architecture": "gemma3",
          "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(n - 259)],
          "tokenizer.ggml.token_type": [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * (n - 259)}
    start = time.perf_counter()
    tok = tokenizers.Tokenizer.from_str(gguf_tokenizer_json(kv))
    assert time.perf_counter() - start < 30  # generous for a loaded machine: a few seconds on two cores
    assert tok.get_vocab_size() == n
    assert tok.decode(tok.encode("a tea bath").ids) == "a tea bath"


# -- byte-level BPE ("gpt2") ------------------------------------------------------------------------

#: llama.cpp's own spellings of the regexes (llama-vocab.cpp), to check ours split the same way
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SPLIT_TEXTS = ["12345 and 1234567", "Hello\n\nworld", "I'VE been told he'S there, we'Ve 'RE",
               "  leading and trailing  ", "tabs\t\tand\r\nlines \n x", "naïve café 日本語 2024年",
               "don't stop!!! ...ok?? (x+y)*3", "a\n\n\n  b   \n"]


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_level_kv(pre: str | None, **extra) -> dict:
    tokens, merges = byte_level_vocab()
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
          "tokenizer.ggml.token_type": [NORMAL] * (len(tokens) - 1) + [CONTROL], **extra}
    if pre is not None:
        kv["tokenizer.ggml.pre"] = pre
    return kv


def _pieces(tok, text: str) -> list[str]:
    back = {c: b for b, c in _byte_to_unicode().items()}
    return [bytes(back[c] for c in piece).decode("utf-8") for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text)]


def _tokenizer(pre: str | None, **extra):
    return tokenizers.Tokenizer.from_str(gguf_tokenizer_json(_byte_level_kv(pre, **extra)))


@pytest.mark.parametrize("pre, regex", [("llama-bpe", LLAMA3), ("llama3", LLAMA3), ("smaug-bpe", LLAMA3),
                                        ("dbrx", LLAMA3), ("falcon3", LLAMA3), ("qwen2", QWEN2),
                                        ("deepseek-r1-qwen", QWEN2), ("gpt2", GPT2), ("phi-2", GPT2),
                                        ("olmo", GPT2), ("default", GPT2), (None, GPT2)])
def test_byte_level_split_matches_llama_cpp_regex(pre, regex):
    re = pytest.importorskip("regex")
    tok = _tokenizer(pre)
    for text in SPLIT_TEXTS:
        assert _pieces(tok, text) == re.findall(regex, text), text
        assert tok.decode(tok.encode(text).ids) == text


@pytest.mark.parametrize("pre, text, want", [
    ("llama-bpe", "12345", ["123", "45"]),
    ("qwen2", "12345", ["1", "2", "3", "4", "5"]),
    ("gpt2", "12345", ["12345"]),
    ("smollm", "12345", ["1", "2", "3", "4", "5"]),
    ("starcoder", "x 12", ["x", " ", "1", "2"]),
    ("llama-bpe", "Hello\n\nworld", ["Hello", "\n\n", "world"]),
    ("qwen2", "Hello\n\nworld", ["Hello", "\n\n", "world"]),
    ("gpt2", "Hello\n\nworld", ["Hello", "\n", "\n", "world"]),
    ("llama-bpe", "I'VE", ["I", "'VE"]),
    ("qwen2", "I'VE", ["I", "'VE"]),
    ("gpt2", "I'VE", ["I", "'", "VE"]),
    ("llama-bpe", "don't", ["don", "'t"]),
    ("llama-bpe", "a...!\n\nb", ["a", "...!\n\n", "b"]),
    ("gpt2", "a...!\n\nb", ["a", "...!", "\n", "\n", "b"]),
    ("qwen35", "ka\u0301x 12", ["ka\u0301x", " ", "1", "2"]),
    ("qwen2", "ka\u0301x 12", ["ka", "\u0301x", " ", "1", "2"]),  # the mark: a non-letter before "x"
    ("tekken", "HelloWorld 12", ["Hello", "World", " ", "1", "2"]),
    ("gpt-4o", "HelloWorld's 1234", ["Hello", "World's", " ", "123", "4"]),
])
def test_byte_level_split_by_hand(pre, text, want):
    assert _pieces(_tokenizer(pre), text) == want


def test_byte_level_flags_follow_llama_cpp():
    import json

    def model(pre, **extra):
        return json.loads(gguf_tokenizer_json(_byte_level_kv(pre, **extra)))["model"]

    assert model("llama-bpe")["ignore_merges"] and model("tekken")["ignore_merges"]
    assert not model("smaug-bpe")["ignore_merges"] and not model("qwen2")["ignore_merges"]
    eot = 299  # byte_level_vocab's special token
    assert _tokenizer("llama-bpe", **{"tokenizer.ggml.bos_token_id": eot}).encode("hi").ids[0] == eot
    ids = _tokenizer("llama-bpe", **{"tokenizer.ggml.bos_token_id": eot,
                                     "tokenizer.ggml.add_bos_token": False}).encode("hi").ids
    assert eot not in ids
    assert eot not in _tokenizer("qwen2", **{"tokenizer.ggml.bos_token_id": eot}).encode("hi").ids
    ids = _tokenizer("qwen2", **{"tokenizer.ggml.eos_token_id": eot, "tokenizer.ggml.add_eos_token": True}).encode("hi").ids
    assert ids[-1] == eot
    assert _tokenizer("qwen2").encode("x<|endoftext|>").ids[-1] == eot  # control tokens stay whole


# -- errors -----------------------------------------------------------------------------------------

def test_unknown_pre_tokenizer_and_model_are_one_line_errors():
    with pytest.raises(ModelError, match="pre-tokenizer 'no-such-pre' is not supported") as err:
        gguf_tokenizer_json(_byte_level_kv("no-such-pre"))
    assert "\n" not in str(err.value) and "llama-bpe" in str(err.value) and "qwen2" in str(err.value)
    for kind in ("bert", "t5", "rwkv"):
        with pytest.raises(ModelError, match=f"tokenizer model '{kind}' is not supported") as err:
            gguf_tokenizer_json({**_byte_level_kv(None), "tokenizer.ggml.model": kind})
        assert "\n" not in str(err.value)
    assert gguf_tokenizer_json({"tokenizer.ggml.model": "gpt2"}) is None  # no vocabulary: no tokenizer
