"""Read a transformers folder saved with rbe codes (``quant_method: "rbe"``) as rbe tensors.

``HFFolder`` has the read interface of ``rbe_core.RBEFile`` (a mapping name -> ``Encoded``,
``headers``, ``metadata``, ``status``), so ``rbe inspect``, ``rbe eval`` and ``rbe serve`` take such
a folder where they take an .rbe file: each quantized layer's weight is its codes (checked against
the checksum in ``config.json``), every other tensor is read as ``raw`` float32, and the metadata
describes the model for rbe's own implementation when it has one for that ``model_type``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..abc import Encoded
from ..container import TensorFile
from ..errors import ChecksumError, RBEFormatError
from ..registry import get_codec

#: Payload buffer prefix and the marker tensor's name, as ``rbe_core.hf.layers.QuantizedLinear`` saves them.
FIELD_PREFIX = "rbe_"
MARKER = "weight"


def quantization_config(path: str | os.PathLike) -> dict | None:
    """The folder's rbe ``quantization_config`` (None when ``path`` is not such a folder)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        qc = json.loads(config.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "rbe" else None


class HFFolder(TensorFile):
    """A transformers folder with rbe codes, read lazily: tensor name -> ``Encoded``."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        qc = quantization_config(self.path)
        if qc is None:
            raise RBEFormatError(f"{self.path}: not a transformers folder saved with rbe "
                                 "(config.json has no quantization_config with quant_method 'rbe')")
        self.hf_config = json.loads((self.path / "config.json").read_text())
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise RBEFormatError(f"{self.path}: no .safetensors weights")
        self._owner = {}
        try:
            for file in files:
                handle = safe_open(str(file), framework="numpy")
                self._owner.update(dict.fromkeys(handle.keys(), handle))
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise RBEFormatError(f"{self.path}: not readable safetensors: {exc}") from exc
        modules = qc.get("modules") or {}
        if not isinstance(modules, dict):
            raise RBEFormatError(f"{self.path}: quantization_config.modules is not an object")
        self._modules = {f"{m}.weight": (m, e) for m, e in modules.items()}
        owned = {f"{m}.{MARKER}" for m in modules} | {
            k for k in self._owner if k.rpartition(".")[0] in modules and k.rpartition(".")[2].startswith(FIELD_PREFIX)}
        self.headers = {}
        for name, (_m, e) in self._modules.items():
            conv1d = bool(e.get("conv1d"))
            shape = list(e["shape"])[::-1] if conv1d else list(e["shape"])
            self.headers[name] = {"codec": {"id": "raw"} if conv1d else e["codec"], "plugin": None, "shape": shape,
                                  "dtype": "float32", "source": name, "fields": sorted(e["fields"]),
                                  "sha256": e.get("sha256")}
        for key in sorted(set(self._owner) - owned):
            handle = self._owner[key]
            self.headers[key] = {"codec": {"id": "raw"}, "plugin": None, "dtype": "float32", "source": key,
                                 "shape": list(handle.get_slice(key).get_shape()), "fields": ["data"], "sha256": None}
        self.metadata = self._model_metadata()

    def _model_metadata(self) -> dict:
        """``rbe.model`` etc. when rbe implements this ``model_type`` (else only the tokenizer)."""
        from ..models import spec_for_hf
        from ..models.sources import _hf_chat_template, _sentence_transformers_extras
        from ..models.spec import ModelError, model_metadata

        tok = self.path / "tokenizer.json"
        tokenizer = tok.read_text() if tok.is_file() else None
        try:
            spec = spec_for_hf(self.hf_config.get("model_type"))
            cfg = spec.from_hf_config(self.hf_config, list(self.headers), _sentence_transformers_extras(self.path))
        except (ModelError, KeyError):
            return {"rbe.tokenizer": json.loads(tokenizer) if tokenizer else None}
        return model_metadata(spec, cfg, tokenizer, _hf_chat_template(self.path))

    def _array(self, key: str) -> np.ndarray:
        try:
            return self._owner[key].get_tensor(key)
        except KeyError:
            raise RBEFormatError(f"{self.path}: tensor {key!r} is missing") from None
        except Exception as exc:
            raise RBEFormatError(f"{self.path}: cannot read {key!r}: {exc}") from exc

    def __getitem__(self, name: str) -> Encoded:
        if name not in self._modules:
            if name not in self.headers:
                raise KeyError(name)
            return get_codec("raw").encode(np.asarray(self._array(name), dtype=np.float32), source=name)
        module, e = self._modules[name]
        payload = {f: self._array(f"{module}.{FIELD_PREFIX}{f}") for f in e["fields"]}
        enc = Encoded(get_codec(e["codec"]), tuple(e["shape"]), payload, source=name)
        if e.get("sha256") and enc.checksum != e["sha256"]:
            raise ChecksumError(f"tensor {name!r}: checksum mismatch (file is corrupt or was modified)")
        enc.codec.validate(enc)
        if e.get("conv1d"):  # rbe's GPT-2 reads Conv1D weights as stored by HF: (in, out)
            return get_codec("raw").encode(np.ascontiguousarray(enc.decode().T), source=name)
        return enc

    def close(self) -> None:
        self._owner = {}
