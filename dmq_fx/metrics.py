"""The error measure used everywhere in dmq_fx (report, benchmarks, tests): a leaf module."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["prediction", "sqnr_db"]


def prediction(result: Any) -> torch.Tensor:
    """The prediction in a UNet's result: a diffusers output's ``sample``, a tuple's first
    item, or the tensor itself (what the error measures compare)."""
    if isinstance(result, torch.Tensor):
        return result
    if hasattr(result, "sample"):
        return result.sample
    return result[0]


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (test - ref)^2)`` in dB,
    in float64; inf when the two are equal, -inf when the reference is all zeros (and they
    differ)."""
    noise = (test.double() - reference.double()).pow(2).sum().item()
    signal = reference.double().pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf
