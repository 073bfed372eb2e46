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


def gguf_tokenizer_json(kv: Mapping[str, Any]) -> str | None:
    """A ``tokenizers`` JSON for a GGUF file's embedded byte-level BPE vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = kv.get("tokenizer.ggml.tokens")
    if not tokens:
        return None
    kind = kv.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' only)")
    pre = kv.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(kv.get("tokenizer.ggml.add_space_prefix", False)),
                                          use_regex=True)
    if pre == "smollm":  # llama.cpp: split every digit, then the GPT-2 regex
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2", "gpt-2"):
        pre_tok = byte_level
    else:
        raise ModelError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: default, gpt2, smollm)")
    merges = [tuple(m.split(" ", 1)) for m in kv.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    types = kv.get("tokenizer.ggml.token_type") or []
    special = [t for t, ty in zip(tokens, types, strict=False) if ty in (_GGUF_CONTROL, _GGUF_USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    bos = kv.get("tokenizer.ggml.bos_token_id")
    if kv.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                           special_tokens=[(tokens[bos], bos)])
    return tok.to_str()


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
