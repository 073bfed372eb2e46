"""``RbeConfig``: the ``quantization_config`` of a transformers model compressed by rbe (``quant_method: "rbe"``).

Below both ``quantize`` (which attaches one to the model it compresses) and ``quantizer`` (the
``HfQuantizer`` that reads it). Imports transformers' config base class only.
"""

from __future__ import annotations

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..version import __version__

QUANT_METHOD = "rbe"


class RbeConfig(QuantizationConfigMixin):
    """How to compress a transformers model with rbe (the arguments of ``rbe_core.hf.quantize``).

    ``codec``: an rbe codec id or config (default ``int8``); ``target_bpw``: a bits/weight budget
    chosen among the codec's settings; ``calibration``: a text file to calibrate on (needs the
    model's tokenizer next to the weights); ``include``/``exclude``: module-name globs; ``backend``:
    the rbe backend to run on. ``modules`` is filled by quantization (name -> layer entry) and is
    what a saved folder is loaded from.
    """

    def __init__(self, codec: str | dict | None = None, target_bpw: float | None = None,
                 calibration: str | None = None, include: list[str] | None = None,
                 exclude: list[str] | None = None, backend: str | None = None,
                 modules: dict[str, Any] | None = None, rbe_version: str | None = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.codec = codec
        self.target_bpw = target_bpw
        self.calibration = calibration
        self.include = include
        self.exclude = exclude
        self.backend = backend
        self.modules = modules or {}
        self.rbe_version = rbe_version or __version__
        unknown = sorted(set(kwargs) - {"quant_method"})
        if unknown:
            raise ValueError(f"RbeConfig: unknown option(s) {', '.join(unknown)}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["quant_method"] = QUANT_METHOD
        return out
