"""Checkpoint sources: a HF model directory, a lone .safetensors file, or a llama.cpp .gguf file.

A ``Source`` knows the architecture spec, the normalised config, the tokenizer JSON, every tensor's
name and shape, and loads one tensor at a time (``load``), so conversion can stream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ..container import release
from .spec import ModelError, Spec

_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


@attrs.define
class Source:
    """One checkpoint opened for streaming; ``load(name)`` returns one float tensor (numpy or torch)."""

    path: Path
    spec: type[Spec]
    config: dict[str, Any]
    tokenizer_json: str | None
    shapes: dict[str, tuple[int, ...]]
    _loader: Any
    #: the tokenizer's chat template (Jinja, as transformers and llama.cpp apply it), when known
    chat_template: str | None = None

    def load(self, name: str):
        return self._loader(name)


def open_source(path: str | Path) -> Source:
    """Open a HF directory, .safetensors file or .gguf file; ``ModelError`` for anything else."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return _hf_source(path)
    raise ModelError(f"{path}: not a HF model directory, .safetensors file or .gguf file")


def _hf_source(path: Path) -> Source:
    from . import spec_for_hf

    files = _safetensors_files(path)
    folder = path if path.is_dir() else path.parent
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{folder}: no config.json beside the weights")
    hf = json.loads(config_path.read_text())
    shapes, load = _safetensors_tensors(files)
    spec = spec_for_hf(hf.get("model_type"))
    extras = _sentence_transformers_extras(folder)
    try:
        cfg = spec.from_hf_config(hf, list(shapes), extras)
    except KeyError as exc:
        raise ModelError(f"{config_path}: missing key {exc}") from exc
    tok = folder / "tokenizer.json"
    return Source(path, spec, cfg, tok.read_text() if tok.is_file() else None, shapes, load, _hf_chat_template(folder))


def _hf_chat_template(folder: Path) -> str | None:
    """``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template`` (a string, or the
    one named "default" of a list)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = folder / "tokenizer_config.json"
    try:
        template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _safetensors_files(path: Path) -> list[Path]:
    folder = path if path.is_dir() else path.parent
    files = sorted(folder.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise ModelError(f"{folder}: no .safetensors weights (pytorch .bin checkpoints are not read: no pickle)")
    return files


def _safetensors_tensors(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], Any]:
    """(name -> shape, load(name)) over safetensors files, memory-mapped."""
    from safetensors import safe_open

    owner, shapes = {}, {}
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as exc:
            raise ModelError(f"{file}: not a readable safetensors file: {exc}") from exc
        for key in handle.keys():
            owner[key] = handle
            shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes, lambda name: owner[name].get_tensor(name)


def _gguf_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ModelError(f"{path}: not a readable GGUF file: {exc}") from exc


def _gguf_tensors(reader) -> tuple[dict[str, tuple[int, ...]], Any]:
    """(name -> shape in numpy order, load(name) dequantized to float32). A 3-D tensor of experts
    (``blk.0.ffn_up_exps.weight``, experts x rows x cols) reads as one 2-D tensor per expert,
    ``blk.0.ffn_up_exps.{e}.weight``, each with its own codes."""
    import gguf

    tensors, shapes = {}, {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if len(shape) == 3 and t.name.endswith("_exps.weight"):
            stem = t.name[: -len(".weight")]
            for e in range(shape[0]):
                tensors[f"{stem}.{e}.weight"], shapes[f"{stem}.{e}.weight"] = (t, e), shape[1:]
        else:
            tensors[t.name], shapes[t.name] = (t, None), shape

    def load(name: str) -> np.ndarray:
        t, expert = tensors[name]
        data = t.data if expert is None else t.data[expert]
        out = np.asarray(gguf.quants.dequantize(data, t.tensor_type), dtype=np.float32).reshape(shapes[name])
        release(data)  # the mapped source pages: read once, not kept resident (a 16 GB file is not)
        return out

    return shapes, load


def open_tensors(path: str | Path) -> tuple[dict[str, tuple[int, ...]], Any]:
    """Any checkpoint's tensors without a model config: (name -> shape, load(name))."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_tensors(_gguf_reader(path))
    if path.is_dir() or path.suffix == ".safetensors":
        return _safetensors_tensors(_safetensors_files(path))
    raise ModelError(f"{path}: not a HF model directory, .safetensors file or .gguf file")


def _sentence_transformers_extras(folder: Path) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    modules = folder / "modules.json"
    if modules.is_file():
        kinds = [m.get("type", "") for m in json.loads(modules.read_text())]
        extras["normalize"] = any(k.endswith("Normalize") for k in kinds)
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        extras["max_seq_length"] = json.loads(st.read_text()).get("max_seq_length")
    return extras


def gguf_metadata(reader) -> dict[str, Any]:
    """GGUF key/values as Python values (strings, numbers, lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # a field type this gguf version cannot render: not needed by rbe
            continue
    return out


# GGUF ``tokenizer.ggml.pre`` -> how llama.cpp's llama-vocab.cpp splits text before byte-level BPE. The
# regexes are the tokenizer.json originals that llama.cpp's (adapted) ones reproduce.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SEED_CODER_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                     r"|\s+(?!\S)|\s+")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
                rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_table() -> dict[str, tuple[Any, bool, bool]]:
    """name -> (split, ignore_merges, add_bos default): split ``"gpt2"`` is GPT-2's regex (ByteLevel's
    own), ``"digits"`` that regex after isolating every digit, else the regexes to split by in turn."""
    families = [
        # llama.cpp's DEFAULT type splits differently; a GGUF saying "default" gets GPT-2's regex, as before
        (("default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling",
          "a.x-4.0", "gigachat", "mellum"), "gpt2", False, False),
        (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
         "digits", False, False),
        (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
         (_LLAMA3_SPLIT,), True, True),
        (("dbrx", "smaug-bpe", "glm4", "chatglm-bpe"), (_LLAMA3_SPLIT,), False, False),
        (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open", "grok-2"),
         (_QWEN2_SPLIT,), False, False),
        (("qwen35",), (_QWEN35_SPLIT,), False, False),
        (("seed-coder",), (_SEED_CODER_SPLIT,), False, False),
        (("tekken",), (_TEKKEN_SPLIT,), True, True),
        (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), (_GPT4O_SPLIT,), False, False),
    ]
    return {name: (split, ignore, bos) for names, split, ignore, bos in families for name in names}


_GGUF_PRE = _pre_table()
_GGUF_UNKNOWN = 2


def gguf_tokenizer_json(kv: Mapping[str, Any]) -> str | None:
    """A ``tokenizers`` JSON for a GGUF file's embedded vocabulary: byte-level BPE (``tokenizer.ggml.model``
    "gpt2", split as llama.cpp splits for ``tokenizer.ggml.pre``) or SentencePiece ("llama": the BPE
    model transformers' LlamaConverter/GemmaConverter build, merges recovered from the scores)."""
    tokens = kv.get("tokenizer.ggml.tokens")
    if not tokens:
        return None
    tokens = list(tokens)
    kind = kv.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok, add_bos = _gguf_byte_level(kv, tokens)
    elif kind == "llama":
        tok, add_bos = _gguf_sentencepiece(kv, tokens), True
    else:
        raise ModelError(f"GGUF tokenizer model {kind!r} is not supported "
                         "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")
    _gguf_post_processor(tok, kv, tokens, add_bos)
    return tok.to_str()


def _gguf_byte_level(kv: Mapping[str, Any], tokens: list[str]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = kv.get("tokenizer.ggml.pre") or "default"  # llama.cpp: none given is "default"
    if pre not in _GGUF_PRE:
        raise ModelError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(_GGUF_PRE))})")
    split, ignore_merges, add_bos = _GGUF_PRE[pre]
    if split in ("gpt2", "digits"):
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=bool(kv.get("tokenizer.ggml.add_space_prefix", False)),
                                           use_regex=True)
        if split == "digits":  # llama.cpp: isolate every digit, then the GPT-2 regex
            pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tok])
    else:  # llama.cpp's BPE tokenizer ignores add_space_prefix
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated") for r in split]
                                          + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    merges = [tuple(m.split(" ", 1)) for m in kv.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    types = kv.get("tokenizer.ggml.token_type") or []
    special = [t for t, ty in zip(tokens, types, strict=False) if ty in (_GGUF_CONTROL, _GGUF_USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok, add_bos


def _gguf_sentencepiece(kv: Mapping[str, Any], tokens: list[str]):
    """SentencePiece as llama.cpp runs it: "▁" for spaces (one prepended unless ``add_space_prefix`` is
    false, as Gemma writes), the best-scored pair merged first, unknown characters as ``<0xXX>`` bytes;
    control and unknown tokens special, user-defined ones (matched in the raw text) plain added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    n = len(tokens)
    types = list(kv.get("tokenizer.ggml.token_type") or [1] * n)
    if str(kv.get("general.architecture", "")).startswith("gemma") or not kv.get("tokenizer.ggml.scores"):
        # transformers' GGUF reader: Gemma's scores do not follow its merge order, the token order does
        scores = [-float(i) for i in range(n)]
    else:
        scores = [float(s) for s in kv["tokenizer.ggml.scores"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    if kv.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in kv["tokenizer.ggml.merges"]]
    else:
        merges = _spm_merges(tokens, scores, vocab)
    unk = kv.get("tokenizer.ggml.unknown_token_id")
    if unk is None or not 0 <= int(unk) < n:
        unk = next((i for i, ty in enumerate(types) if ty == _GGUF_UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=None if unk is None else tokens[int(unk)],
                               fuse_unk=True, byte_fallback=True))
    prefix = bool(kv.get("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prefix else replace
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if prefix else steps)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=False) if ty in (_GGUF_CONTROL, _GGUF_UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types, strict=False) if ty == _GGUF_USER_DEFINED])
    return tok


def _spm_merges(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """transformers' ``generate_merges``: every split of every token into two tokens, the merged token's
    score highest first (then the longer left part, the longer right part, token order, part ids)."""
    lefts, rights, keys = [], [], []
    get = vocab.get
    for i, piece in enumerate(tokens):
        local = []
        for k in range(1, len(piece)):
            a = get(piece[:k])
            if a is not None:
                b = get(piece[k:])
                if b is not None:
                    local.append((a, b, k))
        if local:
            local.sort()
            for a, b, k in local:
                lefts.append(a)
                rights.append(b)
                keys.append((scores[i], k, len(piece) - k))
    if not keys:
        return []
    key = np.asarray(keys, dtype=np.float64)
    order = np.lexsort((-key[:, 2], -key[:, 1], -key[:, 0]))  # stable: ties keep generation order
    return [(tokens[lefts[j]], tokens[rights[j]]) for j in order.tolist()]


def _gguf_post_processor(tok, kv: Mapping[str, Any], tokens: list[str], add_bos_default: bool) -> None:
    """BOS/EOS around every sequence as llama.cpp adds them: ``add_bos_token``/``add_eos_token`` when the
    file says, else llama.cpp's default for the tokenizer (BOS for SentencePiece and Llama 3)."""
    from tokenizers import processors

    ends = []
    for key, default, idkey in (("add_bos_token", add_bos_default, "bos_token_id"),
                                ("add_eos_token", False, "eos_token_id")):
        flag = kv.get(f"tokenizer.ggml.{key}")
        tid = kv.get(f"tokenizer.ggml.{idkey}")
        ok = (default if flag is None else bool(flag)) and tid is not None and 0 <= int(tid) < len(tokens)
        ends.append((tokens[int(tid)], int(tid)) if ok else None)
    bos, eos = ends
    if bos is None and eos is None:
        return
    first = ([bos[0]] if bos else []) + ["$A"] + ([eos[0]] if eos else [])
    second = ([f"{bos[0]}:1"] if bos else []) + ["$B:1"] + ([f"{eos[0]}:1"] if eos else [])
    tok.post_processor = processors.TemplateProcessing(
        single=first, pair=first + second, special_tokens=sorted({e for e in (bos, eos) if e is not None}))


def _gguf_source(path: Path) -> Source:
    from . import spec_for_gguf

    reader = _gguf_reader(path)
    kv = gguf_metadata(reader)
    try:
        spec = spec_for_gguf(str(kv.get("general.architecture", "?")))
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    shapes, load = _gguf_tensors(reader)
    cfg = spec.from_gguf(kv, list(shapes))
    template = kv.get("tokenizer.chat_template")
    return Source(path, spec, cfg, gguf_tokenizer_json(kv), shapes, load, template if isinstance(template, str) else None)
