"""Peer PTQ methods for the benchmark scripts (benchmark-only code, not part of dmq_fx).

``torchao_fx_quantize``: torch.ao's own static PTQ (``quantize_fx.prepare_fx`` / ``convert_fx``
with the x86 default qconfig mapping) on the graph from ``dmq_fx.trace``, so none of dmq_fx's
quantization code is in that row.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

import dmq_fx
from dmq_fx.quantize.qconfig import FLOAT_MODULE_NAME_REGEXES, FLOAT_MODULE_NAMES


def parse_bits(bits: str) -> tuple[int, int]:
    """``"w4a8"`` -> (4, 8)."""
    if not (bits.startswith("w") and "a" in bits):
        raise ValueError(f"bit setting {bits!r} is not of the form w<bits>a<bits>, e.g. w4a8")
    return int(bits[1 : bits.index("a")]), int(bits[bits.index("a") + 1 :])


def torchao_fx_quantize(
    model: torch.nn.Module,
    example: tuple[Sequence[Any], dict[str, Any]],
    batches: Iterable[tuple[Sequence[Any], dict[str, Any]]],
) -> torch.fx.GraphModule:
    """torch.ao FX PTQ (x86 default: 8-bit weights, 7-bit reduce_range activations)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    graph = dmq_fx.trace(model, *example)
    mapping = get_default_qconfig_mapping("x86")
    for name in FLOAT_MODULE_NAMES:  # the same float layers as dmq_fx
        mapping.set_module_name(name, None)
    for regex in FLOAT_MODULE_NAME_REGEXES:
        mapping.set_module_name_regex(regex, None)
    # Nodes of a pre-traced graph carry no module scope in torch.ao: the int64 timestep's
    # multiply can only be kept off a (crashing) HistogramObserver by its type.
    mapping.set_object_type(operator.mul, None).set_object_type(torch.mul, None)
    with warnings.catch_warnings():
        # torch.ao FX mode's deprecation notices: this row measures that API on purpose.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        prepared = prepare_fx(graph, mapping, tuple(example[0]))
        with torch.no_grad():
            for args, kwargs in batches:
                prepared(*args, **kwargs)
        return convert_fx(prepared)
