"""The quantizer modes: every activation and weight fake quantizer of a prepared graph is in one
of three modes, switched here and nowhere else.

- ``"float"``: passes its input through and observes nothing (the float model);
- ``"observe"``: records ranges (its observer runs) and passes float through;
- ``"simulate"``: applies its quantization (fake quantization), observers off.

:func:`quantizer_mode` switches for the duration of a ``with`` block and puts every quantizer's
previous flags back on exit (exceptions included); :func:`set_quantizer_mode` switches for good
(what a calibration stage does before its work, and ``calibrate`` after the last stage).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
from torch import fx
from torch.ao.quantization.fake_quantize import FakeQuantize, FakeQuantizeBase

from dmq_fx.errors import ConfigError
from dmq_fx.graph.meta import ANNOTATION_KEY, quantized_layer_nodes
from dmq_fx.passes import input_quantizer_name, weight_quantizer

__all__ = [
    "FixedModeQuantizer",
    "MODES",
    "fix_quantizer_modes",
    "Mode",
    "input_quantizers",
    "layer_input_quantizer_names",
    "layer_quantizers",
    "quantizer_mode",
    "set_quantizer_mode",
    "weight_quantizers",
]

Mode = Literal["float", "observe", "simulate"]
MODES: tuple[str, ...] = ("float", "observe", "simulate")
_WHICH = ("all", "activations", "weights")


def layer_input_quantizer_names(node: fx.Node) -> list[str]:
    """Qualified names of a quantized layer's activation quantizers (one per input group)."""
    n = len(node.meta[ANNOTATION_KEY].input_groups)
    return [input_quantizer_name(node.target, g, n) for g in range(n)]


def layer_quantizers(gm: fx.GraphModule, node: fx.Node) -> list[FakeQuantizeBase]:
    """A quantized layer's activation quantizers, then its weight fake quantizers."""
    inputs = [gm.get_submodule(name) for name in layer_input_quantizer_names(node)]
    return inputs + list(weight_quantizer(gm.get_submodule(node.target)).fake_quants)


def input_quantizers(gm: fx.GraphModule) -> list[FakeQuantizeBase]:
    """The activation fake quantizers of every quantized layer, in graph order."""
    return [
        gm.get_submodule(name)
        for node in quantized_layer_nodes(gm)
        for name in layer_input_quantizer_names(node)
    ]


def weight_quantizers(gm: fx.GraphModule) -> list[FakeQuantizeBase]:
    """The weight fake quantizers, one per input group of each quantized layer, in graph order."""
    return [
        fq
        for node in quantized_layer_nodes(gm)
        for fq in weight_quantizer(gm.get_submodule(node.target)).fake_quants
    ]


def _select(
    target: fx.GraphModule | Iterable[FakeQuantizeBase], which: str
) -> list[FakeQuantizeBase]:
    if which not in _WHICH:
        raise ConfigError(f"quantizer_mode: which must be one of {_WHICH}, got {which!r}")
    if not isinstance(target, fx.GraphModule):
        if which != "all":
            raise ConfigError("quantizer_mode: 'which' selects among a graph's quantizers only")
        return list(target)
    acts = input_quantizers(target) if which in ("all", "activations") else []
    return acts + (weight_quantizers(target) if which in ("all", "weights") else [])


def _apply(quantizers: Iterable[FakeQuantizeBase], mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown quantizer mode {mode!r}; known: {MODES}")
    for q in quantizers:
        q.enable_observer(mode == "observe")
        q.enable_fake_quant(mode == "simulate")


def set_quantizer_mode(
    target: fx.GraphModule | Iterable[FakeQuantizeBase], mode: Mode, which: str = "all"
) -> None:
    """Put the quantizers of a prepared graph (``which``: ``"all"``, ``"activations"`` or
    ``"weights"``), or the given quantizers, in ``mode`` and leave them there."""
    _apply(_select(target, which), mode)


@contextlib.contextmanager
def quantizer_mode(
    target: fx.GraphModule | Iterable[FakeQuantizeBase], mode: Mode, which: str = "all"
) -> Iterator[None]:
    """``with quantizer_mode(prepared, "float"):`` runs the block with the selected quantizers
    in ``mode``; each one's previous observer and fake-quant flags come back afterwards."""
    quantizers = _select(target, which)
    saved = [(bool(q.fake_quant_enabled[0]), bool(q.observer_enabled[0])) for q in quantizers]
    _apply(quantizers, mode)
    try:
        yield
    finally:
        for q, (quantizing, observing) in zip(quantizers, saved):
            q.enable_fake_quant(quantizing)
            q.enable_observer(observing)


class FixedModeQuantizer(torch.nn.Module):
    """A quantizer in the mode it was in when wrapped, the flags read once.

    torch.ao's ``FakeQuantize.forward`` reads its mode flags from its buffers on every call: on
    an accelerator that is a host sync per quantizer per forward. A learning loop runs the unit
    graph hundreds of times in one mode, so it runs these stand-ins: pass-through when the
    quantizer was off, torch.ao's own fake-quant function on its qparams when it simulated
    (the same op ``FakeQuantize.forward`` calls); any other quantizer (observing, or a dmq_fx
    PTS / table quantizer) is called as it is.
    """

    def __init__(self, quantizer: FakeQuantizeBase):
        super().__init__()
        self.quantizer = quantizer
        self.observing = bool(quantizer.observer_enabled[0])
        self.quantizing = bool(quantizer.fake_quant_enabled[0])
        self.plain = type(quantizer) is FakeQuantize

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        # (a per-timestep table quantizer is called with the timestep too)
        q = self.quantizer
        if self.observing or (self.quantizing and not self.plain):
            return q(x, *args)
        if not self.quantizing:
            return x
        if q.is_per_channel:
            return torch.fake_quantize_per_channel_affine(
                x, q.scale, q.zero_point, q.ch_axis, q.quant_min, q.quant_max
            )
        return torch.fake_quantize_per_tensor_affine(
            x, q.scale, q.zero_point, q.quant_min, q.quant_max
        )


def fix_quantizer_modes(unit: fx.GraphModule) -> None:
    """Replace each quantizer a unit graph (``dmq_fx.graph.units.unit_graph``) calls by a
    :class:`FixedModeQuantizer` of its current mode; the unit graph's parents are its own, so
    the graph it was cut from keeps its quantizers."""
    for node in unit.graph.nodes:
        if node.op == "call_module":
            module = unit.get_submodule(node.target)
            if isinstance(module, FakeQuantizeBase):
                unit.set_submodule(node.target, FixedModeQuantizer(module))
