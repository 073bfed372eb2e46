"""Models: the architectures rbe runs, described (``spec``, ``families``: no torch), run by torch
modules (``common``, ``bert``, ``gpt2``, ``decoder``, ``build``) or entirely in a native engine
(``generation.NativeLM``), loaded from files (``loading``) and read from sources (``sources``)."""

from .families import SPECS, get_spec, mini_gpt2_config, spec_for_gguf, spec_for_hf
from .spec import ModelError, NativePlan, Spec, load_tokenizer, model_metadata

__all__ = ["SPECS", "ModelError", "NativePlan", "Spec", "get_spec", "load_tokenizer", "mini_gpt2_config",
           "model_metadata", "spec_for_gguf", "spec_for_hf"]
