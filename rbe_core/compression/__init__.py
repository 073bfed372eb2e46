"""Compression: model conversion, calibrated rounding (GPTQ, bit allocation), quality reports and evaluation."""
