"""Pass: LES on a plain float graph, for torch.ao's own prepare_fx / convert_fx."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from dmq_fx.passes.insert_les_scales import tau_per_weight
from torch import fx

__all__ = ["rescale_for_les"]


def _scale_input_channels(layer: torch.nn.Module, tau: torch.Tensor) -> None:
    weight = layer.weight
    with torch.no_grad():
        weight.mul_(tau_per_weight(tau, weight, getattr(layer, "groups", 1)).to(weight.dtype))


def rescale_for_les(gm: fx.GraphModule, taus: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """Apply Learned Equivalent Scaling vectors to a float graph, with no dmq_fx module left.

    Matches: ``call_module`` nodes of ``nn.Conv2d`` / ``nn.Linear`` whose target is a key of
    ``taus`` (one entry per input channel, e.g. from :func:`dmq_fx.methods.les.learned_taus`).
    Rewrites: ``y = layer(x)`` into ``y = layer(x * inv_tau)`` with ``inv_tau = 1 / tau`` a
    buffer ``<layer>_les_inv_tau`` (shaped for the channel axis: 1 for convs, last for linears)
    and the layer's weight multiplied by ``tau`` along its input channels, in ``gm``'s own copy
    of the layer. The float function is unchanged (up to float rounding); torch.ao's observers
    then see ``x / tau`` and ``tau * W``, as in DMQ. A graph from :func:`dmq_fx.trace` owns its
    modules, so the user's model is not touched.
    """
    targets = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for name, tau in taus.items():
        if name not in targets:
            raise KeyError(f"rescale_for_les: no call_module node {name!r} in the graph")
        node = targets[name]
        layer = gm.get_submodule(name)
        if not isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            raise TypeError(f"rescale_for_les: {name!r} is a {type(layer).__name__}, not a layer")
        tau = torch.as_tensor(tau).detach().float().reshape(-1)
        channels = layer.in_channels if isinstance(layer, torch.nn.Conv2d) else layer.in_features
        if tau.numel() != channels or not bool((tau > 0).all()):
            raise ValueError(
                f"rescale_for_les: tau of {name!r} needs {channels} positive entries, "
                f"got {tau.numel()}"
            )
        shape = (-1, 1, 1) if isinstance(layer, torch.nn.Conv2d) else (-1,)
        buffer = f"{name.replace('.', '_')}_les_inv_tau"
        gm.register_buffer(buffer, (1.0 / tau).reshape(shape))
        with gm.graph.inserting_before(node):
            inv = gm.graph.get_attr(buffer)
            scaled = gm.graph.call_function(torch.mul, (node.args[0], inv))
        node.args = (scaled, *node.args[1:])
        _scale_input_channels(layer, tau)
    gm.graph.lint()
    gm.recompile()
    return gm
