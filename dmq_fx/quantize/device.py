"""The device a graph computes on, and calibration data moved to it once.

Calibration runs where the model is: ``prepared.to("cuda")`` before :func:`dmq_fx.calibrate`
puts observers, LES scales and learned roundings there (they are the graph's buffers and
parameters), and the runner moves every calibration batch to that device once, before the
first stage, so no stage copies data between host and device inside its loops.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils._pytree import tree_map

from dmq_fx.errors import ConfigError

__all__ = ["batches_to_device", "host_copy", "module_device"]


def module_device(module: torch.nn.Module) -> torch.device:
    """The one device of ``module``'s parameters and buffers (CPU for a module without any).

    Raises :class:`~dmq_fx.ConfigError` naming two tensors on different devices: a graph
    split across devices is not calibrated.
    """
    first: tuple[str, torch.device] | None = None
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        if first is None:
            first = (name, tensor.device)
        elif tensor.device != first[1]:
            raise ConfigError(
                f"the graph is on more than one device: {first[0]!r} on {first[1]}, {name!r} "
                f"on {tensor.device}; move it to one device (graph.to(device)) first"
            )
    return torch.device("cpu") if first is None else first[1]


def batches_to_device(batches: list[Any], device: torch.device) -> list[Any]:
    """``batches`` with every tensor on ``device`` (tensors already there are kept as they are)."""
    return [
        tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, batch)
        for batch in batches
    ]


def host_copy(graph: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``graph`` (its ``meta`` included) with every parameter and buffer on the CPU;
    ``graph`` is not modified and no second copy is made on its own device."""
    memo: dict[int, Any] = {}
    for t in (*graph.parameters(), *graph.buffers()):
        if isinstance(t, torch.nn.Parameter):
            memo[id(t)] = torch.nn.Parameter(t.detach().cpu(), requires_grad=t.requires_grad)
        else:
            memo[id(t)] = t.cpu()
    copied = copy.deepcopy(graph, memo)
    if hasattr(graph, "meta"):
        copied.meta = copy.deepcopy(graph.meta, memo)
    return copied
