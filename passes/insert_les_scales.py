"""Pass: Learned Equivalent Scaling (LES) nodes before quantized Conv2d / Linear layers."""

from __future__ import annotations

import torch
from torch import fx

from dmq_fx.graph.meta import ANNOTATION_KEY, LayerQuantSpec, quantized_layer_nodes

from .insert_quantizers import input_quantizer_name

__all__ = [
    "LESScale",
    "ScaleWeightInputChannels",
    "insert_les_scales",
    "les_scale_name",
    "les_units",
    "tau_per_weight",
]


class LESScale(torch.nn.Module):
    """Holds one LES vector ``tau`` (one entry per input channel) and divides activations by it.

    ``forward(x, offset)`` divides ``x`` along its channel axis (1 for Conv2d inputs, the last for
    Linear inputs) by ``tau[offset : offset + channels]``: a split layer's concatenated inputs
    each take their slice.
    """

    def __init__(self, num_channels: int, channel_axis: int):
        super().__init__()
        # learned only inside calibration stages, which switch gradients on for it
        self.tau = torch.nn.Parameter(torch.ones(num_channels), requires_grad=False)
        self.channel_axis = channel_axis

    def broadcastable(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``tau``'s slice for ``x``, shaped to broadcast along ``x``'s channel axis."""
        axis = self.channel_axis % x.dim()
        tau = self.tau[offset : offset + x.shape[axis]]
        return tau.view(-1, *([1] * (x.dim() - axis - 1)))

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return x / self.broadcastable(x, offset)

    def extra_repr(self) -> str:
        return f"channels={self.tau.numel()}, channel_axis={self.channel_axis}"


class ScaleWeightInputChannels(torch.nn.Module):
    """Weight parametrization ``W -> W * tau`` along the input channels.

    Shares the :class:`LESScale` of its LES unit, so the weight and the activation always see
    the same ``tau`` and the float function of the layer is unchanged. For a grouped conv,
    output channel ``o`` of group ``g`` meets input channels ``g * C_in/groups ...`` only.
    """

    def __init__(self, les: LESScale, groups: int = 1):
        super().__init__()
        self.les = les
        self.groups = groups

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * tau_per_weight(self.les.tau, weight, self.groups)


def tau_per_weight(tau: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``tau`` (one entry per input channel) spread to broadcast against ``weight``
    (out, in / groups, ...): output channel ``o`` of group ``g`` meets input channels
    ``g * C_in/groups ...`` only."""
    if groups > 1:
        per_group = weight.shape[0] // groups
        tau = tau.view(groups, 1, -1).expand(-1, per_group, -1).reshape(weight.shape[:2])
    else:
        tau = tau.view(1, -1)
    return tau.view(*tau.shape, *([1] * (weight.dim() - 2)))


def les_scale_name(owner_target: str) -> str:
    """Qualified name of the :class:`LESScale` owned by layer ``owner_target``."""
    return f"{owner_target}_les"


def les_units(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """LES units of ``gm``: owner layer target -> the layer nodes sharing its ``tau``, in order."""
    units: dict[str, list[fx.Node]] = {}
    for node in quantized_layer_nodes(gm):
        spec: LayerQuantSpec = node.meta[ANNOTATION_KEY]
        if spec.les_owner is not None:
            units.setdefault(spec.les_owner, []).append(node)
    return units


def insert_les_scales(gm: fx.GraphModule) -> fx.GraphModule:
    """Insert an LES division before the input quantizers of every layer annotated for LES.

    Matches: ``call_module`` layer nodes whose :class:`~dmq_fx.quantize.annotate.LayerQuantSpec`
    has a
    ``les_owner`` (run after :func:`insert_quantizers`). Layers reading the same tensor (q, k and
    v of an attention) form one unit with one ``tau`` owned by the first of them.
    Rewrites: ``layer_input_quant(x)`` into ``layer_input_quant(owner_les(x))``, one
    ``owner_les`` node per unit (``owner_les(x_g, offset)`` per concatenated input of a split
    layer), registers :class:`LESScale` at ``<owner>_les`` (tau = 1) and puts
    :class:`ScaleWeightInputChannels` first in each layer's weight parametrizations, so the
    weight quantizer sees ``tau * W``. For any ``tau`` the float function is unchanged.
    """
    for owner, nodes in les_units(gm).items():
        first = gm.get_submodule(owner)
        is_conv = isinstance(first, torch.nn.Conv2d)
        channels = first.in_channels if is_conv else first.in_features
        les = LESScale(channels, 1 if is_conv else -1)
        name = les_scale_name(owner)
        gm.add_submodule(name, les)
        divided: dict[tuple[fx.Node, int], fx.Node] = {}
        for node in nodes:
            spec: LayerQuantSpec = node.meta[ANNOTATION_KEY]
            n_groups = len(spec.input_groups)
            offset = 0
            for g in range(n_groups):
                qname = input_quantizer_name(node.target, g, n_groups)
                qnode = next(
                    u for u in gm.graph.nodes if u.op == "call_module" and u.target == qname
                )
                x = qnode.args[0]
                key = (x, offset)
                if key not in divided:
                    with gm.graph.inserting_before(qnode):
                        args = (x,) if n_groups == 1 else (x, offset)
                        divided[key] = gm.graph.call_module(name, args)
                    divided[key].meta["tensor_meta"] = x.meta.get("tensor_meta")
                qnode.args = (divided[key],) + tuple(qnode.args[1:])
                offset += spec.input_groups[g]
            layer = gm.get_submodule(node.target)
            weights = layer.parametrizations.weight
            # first in the chain: the weight quantizers then observe tau * W
            weights.insert(0, ScaleWeightInputChannels(les, getattr(layer, "groups", 1)))
    gm.graph.lint()
    gm.recompile()
    return gm
