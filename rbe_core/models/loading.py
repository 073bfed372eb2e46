"""Loading a compressed model file as a runnable model: the torch model (``load_model``), or for
generation the lightest model that runs it (``load_generator``: no torch on a native engine)."""

from __future__ import annotations

import logging
import os

from ..abc import Backend
from ..errors import NativeUnavailableError
from ..files import open as open_rbe
from ..registry import get_backend
from .families import read_description
from .generation import NativeLM
from .spec import check_engine

log = logging.getLogger("rbe.models")


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
    from .build import attach_native, build_model  # the torch modules: torch is loaded here
    from .common import CausalLM

    f = open_rbe(path)
    tensors = {n: f[n] for n in f}
    be = None if dense else get_backend(backend)
    model = build_model(f.metadata, tensors, be, dense=dense)
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


def load_generator(path: str | os.PathLike, backend: str | None = None, *, engine: str = "auto"):
    """The model stored in ``path`` for inference: a causal LM that ``backend``'s native engine
    runs whole (``NativeLM``: generation without torch) when ``engine`` allows it and the engine
    can run the model, else ``load_model``'s torch model (an encoder, or a causal LM in the
    torch modules; 'native' raises instead of falling back)."""
    check_engine(engine)
    if engine != "torch":
        be = get_backend(backend)
        f = open_rbe(path)
        tensors = {n: f[n] for n in f}
        spec, cfg, _keep, tokenizer = read_description(f.metadata, {n: tuple(t.shape) for n, t in tensors.items()})
        try:
            native = be.native_decoder(spec.native_plan(cfg, set(tensors)), tensors)
        except NativeUnavailableError:
            if engine == "native":
                raise
        else:
            log.info("backend %s: the model runs in its native engine (no torch modules)", be.name)
            return NativeLM(spec, cfg, tokenizer, native)
    return load_model(path, backend, engine=engine)
