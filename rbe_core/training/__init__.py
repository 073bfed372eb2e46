"""Training in the compressed domain: trainable layers and training forms (``trainable``), and
``rbe finetune`` (``finetuning``). The plugin-facing names are re-exported here."""

from .trainable import (
    PhaseForm,
    QATLinear,
    TorchForm,
    TrainableRBEEmbedding,
    TrainableRBELinear,
    as_numpy,
    finalize,
    get_engine,
    get_quantizer,
    prepare_for_training,
    sin_cycle,
    torch_form,
)

__all__ = ["PhaseForm", "QATLinear", "TorchForm", "TrainableRBEEmbedding", "TrainableRBELinear", "as_numpy",
           "finalize", "get_engine", "get_quantizer", "prepare_for_training", "sin_cycle", "torch_form"]
