"""QConfigs and QConfigMappings with DMQ's defaults (docs/methods/quantizers.md).

A ``QConfigMapping`` means what it means in torch.ao: global < object_type < module_name_regex <
module_name (which also covers children), resolved with torch.ao's own helper. dmq_fx quantizes
the inputs and weights of ``Conv2d`` and ``Linear`` layers; everything else stays in float.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization.fx.qconfig_mapping_utils import (
    _maybe_adjust_qconfig_for_module_type_or_name,
)
from torch.ao.quantization.observer import MovingAverageMinMaxObserver

from dmq_fx.errors import ConfigError
from dmq_fx.observers import HistogramRangeObserver, MSEGridSearchPerChannelObserver

__all__ = [
    "ACTIVATION_RANGES",
    "FLOAT_MODULE_NAMES",
    "FLOAT_MODULE_NAME_REGEXES",
    "UNetQConfigMapping",
    "activation_observer",
    "check_bits",
    "get_default_qconfig",
    "get_default_qconfig_mapping",
    "is_float_module",
    "qconfig_for_module",
    "with_float_roles",
    "weight_observer",
    "weight_range",
]

#: Kept in float by the default mapping (with all their children): the first and last conv and
#: the timestep / class / added-condition embedding paths of diffusers UNets. These are roles of
#: a UNet: names relative to the UNet module, wherever it sits in the model (UNetQConfigMapping).
FLOAT_MODULE_NAMES = (
    "conv_in",
    "conv_out",
    "time_proj",
    "time_embedding",
    "class_embedding",
    "add_time_proj",
    "add_embedding",
)
#: Kept in float by the default mapping: every resnet's timestep projection.
FLOAT_MODULE_NAME_REGEXES = (r"(.*\.)?time_emb_proj$",)

#: Moving-average momentum of activation ranges (docs/methods/quantizers.md: 0.95, i.e. torch.ao's
#: constant 0.05).
ACTIVATION_RANGE_MOMENTUM = 0.95

#: how activation ranges are chosen: "minmax" (moving-average min / max) or "histogram" (the
#: range of least L2 quantization error over a histogram of every calibration value)
ACTIVATION_RANGES = ("minmax", "histogram")


def check_bits(value: object, name: str) -> int:
    """Return ``value`` if it is a supported bit width (2 to 8), else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise ConfigError(
            f"{name} must be an integer from 2 to 8 (int8 kernels carry at most 8 bits), "
            f"got {value!r}"
        )
    return value


def weight_range(bits: int) -> tuple[torch.dtype, int, int, torch.qscheme]:
    """The integer weight range of ``bits``-bit weights: (dtype, quant_min, quant_max,
    qscheme); see :func:`weight_observer`."""
    bits = check_bits(bits, "weight_bits")
    if bits == 8:
        return torch.qint8, -128, 127, torch.per_channel_symmetric
    return torch.quint8, 0, 2**bits - 1, torch.per_channel_affine


def is_float_module(name: str, unet_paths: Sequence[str] = ("",)) -> bool:
    """Whether the default mapping keeps the module ``name`` (a qualified name) in float: it or
    one of its parents plays a float role (:data:`FLOAT_MODULE_NAMES`) in one of the UNets at
    ``unet_paths`` (as torch.ao's ``set_module_name`` covers children)."""
    for prefix in unet_paths:
        if not prefix:
            relative = name
        elif name.startswith(prefix + "."):
            relative = name[len(prefix) + 1 :]
        else:
            continue
        if _plays_float_role(relative):
            return True
    return False


def _plays_float_role(name: str) -> bool:
    parts = name.split(".")
    scopes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        scope in FLOAT_MODULE_NAMES
        or any(re.fullmatch(r, scope) for r in FLOAT_MODULE_NAME_REGEXES)
        for scope in scopes
    )


def weight_observer(bits: int = 8):
    """Per-output-channel weight observer with the MSE grid search (p = 2.4) of
    docs/methods/quantizers.md.

    Up to 7 bits the range is asymmetric ``[0, 2^b - 1]`` with a zero point, as in
    docs/methods/quantizers.md; the
    integer weight minus its zero point then fits int8, so int8 kernels carry it exactly. At 8 bits
    no asymmetric form fits int8, so the range is symmetric ``[-128, 127]`` with zero point 0.
    """
    dtype, quant_min, quant_max, qscheme = weight_range(bits)
    return MSEGridSearchPerChannelObserver.with_args(
        dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, ch_axis=0
    )


def activation_observer(bits: int = 8, ranges: str = "minmax"):
    """Per-tensor asymmetric activation observer ``[0, 2^b - 1]``: moving-average min / max, or
    with ``ranges="histogram"`` the range of least quantization error found in a histogram of
    every observed value (:class:`~dmq_fx.observers.HistogramRangeObserver`)."""
    bits = check_bits(bits, "act_bits")
    common = {
        "dtype": torch.quint8,
        "qscheme": torch.per_tensor_affine,
        "quant_min": 0,
        "quant_max": 2**bits - 1,
    }
    if ranges == "histogram":
        return HistogramRangeObserver.with_args(**common)
    if ranges != "minmax":
        raise ConfigError(f"activation ranges {ranges!r}: expected one of {ACTIVATION_RANGES}")
    return MovingAverageMinMaxObserver.with_args(
        averaging_constant=1.0 - ACTIVATION_RANGE_MOMENTUM, **common
    )


def get_default_qconfig(
    weight_bits: int = 8, act_bits: int = 8, activation_ranges: str = "minmax"
) -> QConfig:
    """The QConfig dmq_fx gives every quantized conv and linear by default
    (``activation_ranges``: see :func:`activation_observer`)."""
    return QConfig(
        activation=activation_observer(act_bits, activation_ranges),
        weight=weight_observer(weight_bits),
    )


class UNetQConfigMapping(QConfigMapping):
    """A QConfigMapping whose float roles (:data:`FLOAT_MODULE_NAMES`, every ``time_emb_proj``)
    follow the UNet wherever it is mounted: :func:`dmq_fx.prepare_fx` applies them under each
    diffusers UNet it finds in the model (a wrapper's ``self.unet``, an ``model.diffusion_model``
    prefix), so a bare, a wrapped and a prefixed UNet get the same decisions. An entry set for a
    module's exact name wins over its role."""


def with_float_roles(mapping: QConfigMapping, unet_paths: Sequence[str]) -> QConfigMapping:
    """``mapping`` with the float roles of a :class:`UNetQConfigMapping` spelled out for the
    UNets at ``unet_paths`` (a plain QConfigMapping is returned as it is)."""
    if not isinstance(mapping, UNetQConfigMapping):
        return mapping
    out = QConfigMapping.from_dict(mapping.to_dict())
    for prefix in (p for p in unet_paths if p):  # the root's roles are in the mapping already
        for name in FLOAT_MODULE_NAMES:
            if f"{prefix}.{name}" not in out.module_name_qconfigs:
                out.set_module_name(f"{prefix}.{name}", None)
        for regex in FLOAT_MODULE_NAME_REGEXES:
            out.set_module_name_regex(re.escape(prefix) + r"\." + regex, None)
    return out


def get_default_qconfig_mapping(
    weight_bits: int = 8, act_bits: int = 8, activation_ranges: str = "minmax"
) -> UNetQConfigMapping:
    """A QConfigMapping with the defaults of docs/methods/quantizers.md for diffusers UNets.

    Conv2d and Linear layers get :func:`get_default_qconfig`; ``conv_in``, ``conv_out``, the
    timestep embedding path (``time_proj``, ``time_embedding``, every ``time_emb_proj``) and class
    / added-condition embeddings stay in float. Attention matmuls, norms and nonlinearities are
    never quantized by dmq_fx. These float layers are found by role: under whichever diffusers
    UNet of the model they belong to (:class:`UNetQConfigMapping`). ``activation_ranges``:
    ``"minmax"`` or ``"histogram"`` (:func:`activation_observer`). Edit the result as any
    torch.ao QConfigMapping.
    """
    mapping = UNetQConfigMapping().set_global(
        get_default_qconfig(weight_bits, act_bits, activation_ranges)
    )
    for name in FLOAT_MODULE_NAMES:
        mapping.set_module_name(name, None)
    for regex in FLOAT_MODULE_NAME_REGEXES:
        mapping.set_module_name_regex(regex, None)
    return mapping


def qconfig_for_module(
    mapping: QConfigMapping, module_name: str, module_type: type
) -> QConfig | None:
    """The qconfig torch.ao would give the module ``module_name`` of type ``module_type``."""
    if mapping.module_name_object_type_order_qconfigs:
        raise ConfigError(
            "QConfigMapping.set_module_name_object_type_order applies to functional calls; "
            "dmq_fx quantizes Conv2d / Linear modules only: use set_module_name instead"
        )
    return _maybe_adjust_qconfig_for_module_type_or_name(
        mapping, module_type, module_name, mapping.global_qconfig
    )
