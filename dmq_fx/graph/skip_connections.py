"""Finding the skip-connection layers of a UNet graph by structure (docs/methods/pts.md)."""

from __future__ import annotations

import operator

import torch
from torch import fx

__all__ = ["skip_concatenations", "skip_connection_layers"]

_ADDS = (operator.add, torch.add, operator.iadd)


def _conv(gm: fx.GraphModule, node: fx.Node) -> torch.nn.Conv2d | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    return module if isinstance(module, torch.nn.Conv2d) else None


def _is_shortcut_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A 1x1 conv that changes the channel count, whose input also feeds another branch and
    whose output is added to that branch (the residual add of a resnet block)."""
    conv = _conv(gm, node)
    if conv is None or tuple(conv.kernel_size) != (1, 1) or conv.in_channels == conv.out_channels:
        return False
    inp = node.args[0] if node.args else None
    if not isinstance(inp, fx.Node) or len(inp.users) < 2:
        return False
    return any(u.op == "call_function" and u.target in _ADDS for u in node.users)


def skip_connection_layers(gm: fx.GraphModule) -> list[fx.Node]:
    """The resnet shortcut convs of ``gm``, in graph order.

    Matches ``call_module`` Conv2d nodes with a 1x1 kernel and ``in_channels != out_channels``
    whose input tensor has other users (the resnet's main path) and whose output feeds an add.
    In a diffusers UNet these are the ``conv_shortcut`` of every resnet that changes width,
    among them every decoder resnet, whose input is the skip concatenation. Rewrites nothing.
    Run it on a graph before ``insert_quantizers`` (it reads the layers' own inputs).
    """
    return [n for n in gm.graph.nodes if _is_shortcut_conv(gm, n)]


def skip_concatenations(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``torch.cat(..., dim=1)`` nodes that feed a shortcut conv (the decoder's skips)."""
    out = []
    for layer in skip_connection_layers(gm):
        inp = layer.args[0]
        if inp.op == "call_function" and inp.target is torch.cat and inp not in out:
            dim = inp.args[1] if len(inp.args) > 1 else inp.kwargs.get("dim", 0)
            if dim == 1:
                out.append(inp)
    return out
