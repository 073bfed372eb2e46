"""Training in the compressed domain: training forms (``forms``, ``lowered``), trainable layers
(``trainable``) and ``rbe finetune`` (``finetuning``). The plugin-facing names are re-exported here."""

from .forms import PhaseForm, TorchForm, as_numpy, sin_cycle
from .lowered import LoweredForm
from .trainable import (
    QATLinear,
    TrainableRBEEmbedding,
    TrainableRBELinear,
    finalize,
    get_engine,
    get_quantizer,
    prepare_for_training,
    torch_form,
)

__all__ = ["LoweredForm", "PhaseForm", "QATLinear", "TorchForm", "TrainableRBEEmbedding", "TrainableRBELinear", "as_numpy",
           "finalize", "get_engine", "get_quantizer", "prepare_for_training", "sin_cycle", "torch_form"]
