"""Opening a stored model, whichever kind it is: ``open(path)`` (``rbe_core.open``).

Above both readers it chooses between, so neither imports the other: the .rbe container
(``rbe_core.container.RBEFile``) and the transformers folder saved with rbe codes
(``rbe_core.hf.folder.HFFolder``). Both have the read interface of ``rbe_core.container.TensorFile``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..container import RBEFile, TensorFile
from ..hf.folder import HFFolder

__all__ = ["open"]


def open(path: str | os.PathLike) -> TensorFile:  # noqa: A001 - public API name, mirrors builtins.open
    """Open an .rbe file lazily, or a transformers folder saved with rbe codes (``rbe_core.hf.folder``,
    the same read interface). Raises ``RBEFormatError`` when it is neither."""
    if Path(path).is_dir():
        return HFFolder(path)
    return RBEFile(path)
