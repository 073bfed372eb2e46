"""Loading a compressed model file as a runnable model: the torch model (``load_model``), or for
inference the lightest one that runs it (``load_inference``: no torch on a native engine or,
for encoders, in numpy)."""

from __future__ import annotations

import logging
import os

from ..abc import Backend
from ..container import trim_heap
from ..errors import NativeUnavailableError
from ..files import open as open_rbe
from ..registry import get_backend
from .families import read_description
from .generation import NativeLM
from .numpy_bert import NumpyBert
from .spec import check_engine

log = logging.getLogger("rbe.models")

#: architecture -> the class that runs it as an encoder without torch.
NUMPY_ENCODERS = {"bert": NumpyBert}


def load_model(path: str | os.PathLike, backend: str | None = None, *, dense: bool = False,
               engine: str = "auto"):
    """The torch model stored in an .rbe file (``.generate()`` for LMs, ``.embed()`` for encoders).

    ``backend`` names the compute backend (default: ``$RBE_BACKEND`` or the best available);
    ``dense=True`` decodes every weight into plain fp32 ``nn`` layers (the uncompressed reference).
    ``engine``: 'auto' runs a causal LM's generation (``start``/``step``/``generate``) in the
    backend's native engine when it has one and every tensor lowers to it, else in the torch
    modules (logged once, and why); 'native' requires the engine; 'torch' never uses it. The
    torch modules (``model(ids)``) stay the reference and the training path either way.
    """
    f = open_rbe(path)
    return _torch_model(f.metadata, {n: f[n] for n in f}, None if dense else get_backend(backend), dense, engine)


def _torch_model(metadata, tensors, be: Backend | None, dense: bool, engine: str):
    """``load_model`` on a file already opened and checked (``be`` None: dense)."""
    from .build import attach_native, build_model  # the torch modules: torch is loaded here
    from .common import CausalLM

    model = build_model(metadata, tensors, be, dense=dense)
    if be is not None:
        why = attach_native(model, tensors, be, engine)
        if not why:
            log.info("backend %s: generation runs in its native engine", be.name)
        elif engine == "auto" and isinstance(model, CausalLM):
            has_engine = type(be).native_decoder is not Backend.native_decoder
            (log.warning if has_engine else log.info)(
                "backend %s: generation runs in the torch modules, not the native engine%s", be.name,
                f" ({why})" if not has_engine or log.isEnabledFor(logging.INFO) else " (-v says why)")
    return model


def load_inference(path: str | os.PathLike, backend: str | None = None, *, engine: str = "auto"):
    """The model stored in ``path`` for inference, without torch where it can: a causal LM that
    ``backend``'s native engine runs whole (``NativeLM``) when ``engine`` allows it and the engine
    can run the model; an encoder in numpy around the backend's fused products (``NumpyBert``)
    unless ``engine`` is 'torch'; else ``load_model``'s torch model ('native' raises instead of
    falling back)."""
    check_engine(engine)
    be = get_backend(backend)
    f = open_rbe(path)
    tensors = {n: f[n] for n in f}
    if engine != "torch":
        spec, cfg, keep, tokenizer = read_description(f.metadata, {n: tuple(t.shape) for n, t in tensors.items()})
        trim_heap()  # before the engine copies the weights: the metadata's and tokenizer's leftovers
        if spec.name in NUMPY_ENCODERS:
            return NUMPY_ENCODERS[spec.name](spec, cfg, tokenizer, {n: tensors[n] for n in keep}, be)
        try:
            native = be.native_decoder(spec.native_plan(cfg, set(tensors)), tensors)
        except NativeUnavailableError:
            if engine == "native":
                raise
        else:
            log.info("backend %s: the model runs in its native engine (no torch modules)", be.name)
            return NativeLM(spec, cfg, tokenizer, native)
    return _torch_model(f.metadata, tensors, be, False, engine)  # the file opened and checked once
