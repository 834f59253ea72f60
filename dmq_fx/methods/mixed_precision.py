"""Automatic mixed precision: the layers where low-bit weights hurt most keep 8-bit weights.

A 4-bit weight costs most of a UNet's quantization error, and not evenly: some layers' weight
rounding moves the model's output far more than others'. :func:`weight_sensitivity` measures,
for each layer the mapping quantizes, the SQNR of the model's output with that layer's weights
alone quantized (the default per-channel MSE-searched quantizer at ``weight_bits``) against the
float output, on a few calibration batches. :func:`mixed_precision_mapping` gives 8-bit weights
to the layers adding most output noise per parameter, as long as the average weight width over
the quantized layers (counted by parameter) stays within ``budget_bits``, and returns the
QConfigMapping for ``prepare_fx`` with the choice and its effective bits. Such a model is not a
W4 model: report it with its effective bits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.ao.quantization import QConfig, QConfigMapping
from tqdm.auto import tqdm

from dmq_fx.errors import ConfigError
from dmq_fx.graph.model_identity import unet_paths
from dmq_fx.metrics import prediction
from dmq_fx.quantize.qconfig import (
    check_bits,
    get_default_qconfig_mapping,
    qconfig_for_module,
    weight_observer,
    with_float_roles,
)

__all__ = ["MixedPrecision", "mixed_precision_mapping", "weight_sensitivity"]

_LAYER_TYPES = (torch.nn.Conv2d, torch.nn.Linear)


@dataclasses.dataclass(frozen=True)
class MixedPrecision:
    """The choice :func:`mixed_precision_mapping` made."""

    mapping: QConfigMapping
    #: layers given 8-bit weights, in the order chosen
    eight_bit: tuple[str, ...]
    #: average weight bits over the quantized layers (by parameter count)
    effective_bits: float
    #: per quantized layer, the model's output SQNR in dB with that layer alone at the low width
    sensitivity: dict[str, float]


def _quantized_layers(model: torch.nn.Module, mapping: QConfigMapping) -> dict[str, Any]:
    full = with_float_roles(mapping, unet_paths(model))
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, _LAYER_TYPES) and qconfig_for_module(full, name, type(module))
    }


def _quantized_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    observer = weight_observer(bits)()
    observer(weight.detach().float())
    scale, zero_point = observer.calculate_qparams()
    return torch.fake_quantize_per_channel_affine(
        weight.detach().float(),
        scale.float(),
        zero_point.int(),
        0,
        observer.quant_min,
        observer.quant_max,
    ).to(weight.dtype)


def weight_sensitivity(
    model: torch.nn.Module,
    data: Iterable[tuple[tuple, dict]],
    weight_bits: int = 4,
    mapping: QConfigMapping | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """For each layer ``mapping`` (default: dmq_fx's) quantizes: the SQNR (dB) of the model's
    output with that layer's weights alone at ``weight_bits`` against the float output.

    ``data``: ``(args, kwargs)`` batches the model is called with (a few calibration batches:
    one forward pass per layer and batch). The weights are quantized as ``prepare_fx`` would
    (per channel, MSE-searched steps); a forward hook swaps the layer's output for the one with
    quantized weights, so ``model`` is not modified."""
    weight_bits = check_bits(weight_bits, "weight_bits")
    mapping = mapping if mapping is not None else get_default_qconfig_mapping(weight_bits)
    layers = _quantized_layers(model, mapping)
    if not layers:
        raise ConfigError("weight_sensitivity: the mapping quantizes no Conv2d / Linear layer")
    data = list(data)
    with torch.no_grad():
        reference = [prediction(model(*args, **kwargs)) for args, kwargs in data]
        signal = sum(float(r.double().pow(2).sum()) for r in reference)
        out = {}
        for name, module in tqdm(layers.items(), "weight sensitivity", disable=not progress):
            weight = _quantized_weight(module.weight, weight_bits)
            handle = module.register_forward_hook(_with_weight(weight))
            try:
                noise = sum(
                    float((prediction(model(*args, **kwargs)) - r).double().pow(2).sum())
                    for (args, kwargs), r in zip(data, reference)
                )
            finally:
                handle.remove()
            out[name] = math.inf if noise == 0 else 10 * math.log10(signal / noise)
    return out


def _with_weight(weight: torch.Tensor):
    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            return module._conv_forward(inputs[0], weight, module.bias)
        return torch.nn.functional.linear(inputs[0], weight, module.bias)

    return hook


def mixed_precision_mapping(
    model: torch.nn.Module,
    data: Sequence[tuple[tuple, dict]],
    weight_bits: int = 4,
    act_bits: int = 8,
    budget_bits: float = 4.5,
    mapping: QConfigMapping | None = None,
    progress: bool = True,
) -> MixedPrecision:
    """``mapping`` (default: dmq_fx's at ``weight_bits`` / ``act_bits``) with 8-bit weights (and
    each layer's own activation quantizer) for
    the layers whose low-bit weights add most output error per extra weight bit
    (:func:`weight_sensitivity`: noise energy over parameter count, a greedy knapsack), while
    the average weight width over the quantized layers stays at most ``budget_bits``."""
    weight_bits = check_bits(weight_bits, "weight_bits")
    act_bits = check_bits(act_bits, "act_bits")
    if not weight_bits <= budget_bits <= 8:
        raise ConfigError(
            f"budget_bits={budget_bits}: expected a value from weight_bits ({weight_bits}) to 8"
        )
    base = mapping if mapping is not None else get_default_qconfig_mapping(weight_bits, act_bits)
    sensitivity = weight_sensitivity(model, data, weight_bits, base, progress)
    layers = _quantized_layers(model, base)
    sizes = {name: m.weight.numel() for name, m in layers.items()}
    total = sum(sizes.values())
    bits = weight_bits * total
    chosen = []
    # output noise energy (relative to the signal) per parameter upgraded
    damage = {n: 10 ** (-db / 10) / sizes[n] for n, db in sensitivity.items()}
    for name in sorted(damage, key=damage.get, reverse=True):
        extra = (8 - weight_bits) * sizes[name]
        if (bits + extra) / total > budget_bits:
            continue  # a smaller, less sensitive layer may still fit
        bits += extra
        chosen.append(name)
    out = type(base).from_dict(base.to_dict())
    full = with_float_roles(base, unet_paths(model))
    for name in chosen:  # the layer's own activation quantizer, 8-bit weights
        own = qconfig_for_module(full, name, type(layers[name]))
        out.set_module_name(name, QConfig(activation=own.activation, weight=weight_observer(8)))
    return MixedPrecision(out, tuple(chosen), bits / total, sensitivity)
