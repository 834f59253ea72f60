"""Pass: insert fake quantizers for every annotated Conv2d / Linear node."""

from __future__ import annotations

import torch
from torch import fx
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.nn.utils import parametrize

from dmq_fx.annotate import LayerQuantSpec, make_fake_quantize, quantized_layer_nodes

__all__ = [
    "GroupedWeightFakeQuantize",
    "insert_quantizers",
    "input_quantizer_name",
    "weight_before_quantization",
    "weight_quantizer",
]


class GroupedWeightFakeQuantize(torch.nn.Module):
    """Weight parametrization: one torch.ao FakeQuantize per group of input channels.

    With one group this is the layer's weight quantizer; with several (a shortcut conv fed by a
    skip concatenation) each group of input channels has its own per-output-channel qparams.
    """

    def __init__(self, fake_quants: list[FakeQuantizeBase], split_sizes: tuple[int, ...]):
        super().__init__()
        self.fake_quants = torch.nn.ModuleList(fake_quants)
        self.split_sizes = tuple(split_sizes)

    def split(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """``weight`` cut into the groups' input channels (whole for one group: also grouped
        convs, whose weight axis 1 is ``C_in / groups``)."""
        if len(self.fake_quants) == 1:
            return [weight]
        return list(torch.split(weight, self.split_sizes, dim=1))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        parts = [fq(p) for fq, p in zip(self.fake_quants, self.split(weight))]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def weight_quantizer(layer: torch.nn.Module) -> GroupedWeightFakeQuantize:
    """The weight quantizer of a prepared layer: the last of its weight parametrizations."""
    quantizer = layer.parametrizations.weight[-1]
    if not isinstance(quantizer, GroupedWeightFakeQuantize):
        raise TypeError(f"{type(layer).__name__} has no dmq_fx weight quantizer")
    return quantizer


def weight_before_quantization(layer: torch.nn.Module) -> torch.Tensor:
    """The weight the quantizer sees: the original weight through every parametrization before
    the quantizer (``tau * W`` with LES)."""
    chain = layer.parametrizations.weight
    weight = chain.original
    for module in list(chain)[:-1]:
        weight = module(weight)
    return weight


def input_quantizer_name(layer_target: str, group: int, num_groups: int) -> str:
    """Qualified name of the activation quantizer of ``layer_target``'s input ``group``."""
    return f"{layer_target}_input_quant" + (f"_{group}" if num_groups > 1 else "")


def insert_quantizers(gm: fx.GraphModule) -> fx.GraphModule:
    """Insert the fake quantizers that the annotations of ``gm`` ask for.

    Matches: ``call_module`` nodes carrying a :class:`~dmq_fx.annotate.LayerQuantSpec`.
    Rewrites: ``y = layer(x)`` into ``y = layer(layer_input_quant(x))``, with a torch.ao
    ``FakeQuantize`` module registered beside the layer (``<layer>_input_quant``), and the layer's
    weight parametrized by a :class:`GroupedWeightFakeQuantize`. For a split layer fed by
    ``torch.cat([a, b], 1)``, each of ``a`` and ``b`` gets its own quantizer
    (``<layer>_input_quant_0``, ``_1``) and a new concatenation of the quantized tensors feeds
    the layer; the original concatenation keeps its other users. Observers start enabled and fake
    quantization disabled, as in a torch.ao prepared model.
    """
    for node in quantized_layer_nodes(gm):
        spec: LayerQuantSpec = node.meta["dmq_fx"]
        layer = gm.get_submodule(node.target)
        n_groups = len(spec.input_groups)
        inputs = [node.args[0]] if n_groups == 1 else list(node.args[0].args[0])
        quantized = []
        for g, inp in enumerate(inputs):
            fq = make_fake_quantize(spec.qconfig.activation)
            fq.disable_fake_quant()
            name = input_quantizer_name(node.target, g, n_groups)
            gm.add_submodule(name, fq)
            with gm.graph.inserting_before(node):
                quantized.append(gm.graph.call_module(name, (inp,)))
        if n_groups == 1:
            new_input = quantized[0]
        else:
            with gm.graph.inserting_before(node):
                new_input = gm.graph.call_function(torch.cat, (quantized,), {"dim": 1})
            new_input.meta["tensor_meta"] = node.args[0].meta.get("tensor_meta")
        node.args = (new_input,) + tuple(node.args[1:])
        weight_fqs = []
        for _ in range(n_groups):
            wfq = make_fake_quantize(spec.qconfig.weight)
            wfq.disable_observer()  # weights are observed once, by a calibration stage
            wfq.disable_fake_quant()
            weight_fqs.append(wfq)
        parametrize.register_parametrization(
            layer, "weight", GroupedWeightFakeQuantize(weight_fqs, spec.input_groups), unsafe=True
        )
    gm.graph.lint()
    gm.recompile()
    return gm
