"""Loading a compressed model file as a runnable model (``load_model``)."""

from __future__ import annotations

import logging
import os

from ..abc import Backend
from ..container import open as open_rbe
from ..registry import get_backend
from . import attach_native, build_model
from .common import CausalLM, RBEModel

log = logging.getLogger("rbe.models")


def load_model(path: str | os.PathLike, backend: str | None = None, *, dense: bool = False,
               engine: str = "auto") -> RBEModel:
    """The torch model stored in an .rbe file (``.generate()`` for LMs, ``.embed()`` for encoders).

    ``backend`` names the compute backend (default: ``$RBE_BACKEND`` or the best available);
    ``dense=True`` decodes every weight into plain fp32 ``nn`` layers (the uncompressed reference).
    ``engine``: 'auto' runs a causal LM's generation (``start``/``step``/``generate``) in the
    backend's native engine when it has one and every tensor lowers to it, else in the torch
    modules (logged once, and why); 'native' requires the engine; 'torch' never uses it. The
    torch modules (``model(ids)``) stay the reference and the training path either way.
    """
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
