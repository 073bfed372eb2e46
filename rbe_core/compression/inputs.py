"""Calibration inputs: a model run on one of them, and the rows of its real (not padding) tokens."""

from __future__ import annotations

from collections.abc import Mapping


def run_input(model, inputs):
    """Run ``model`` on one calibration input: positional args (a tuple) or keyword args (a dict)."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)


def real_tokens(rows, mask):
    """The rows of real (not padding) tokens: ``mask`` applies to per-token inputs only (a pooler's
    one row per sentence has no padding to drop)."""
    return rows if mask is None or rows.shape[0] != mask.numel() else rows[mask]
