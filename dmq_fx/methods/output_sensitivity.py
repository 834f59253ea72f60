"""How much the model's output moves with each element of an intermediate value: the weights of
an output-aware reconstruction loss (docs/methods/adaround.md, "Output sensitivity").

Block reconstruction minimises a unit's own output error, every element alike; what the
quantized UNet is judged by is the error of its final noise prediction. To first order a small
error ``d`` at a unit's output ``h`` moves the model's output by ``J d`` (``J``: the Jacobian of
the output with respect to ``h``), so ``|J d|^2 ~= sum_i (J^T J)_ii d_i^2`` keeping the diagonal
(BRECQ's Fisher-diagonal block loss, with the model's own output in place of a task loss).
``diag(J^T J)`` is estimated without forming ``J``: for a Gaussian probe ``v`` at the output,
``E[(J^T v)^2] = diag(J^T J)``, one backward pass per probe (Hutchinson's estimator).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx

from dmq_fx.errors import CalibrationError
from dmq_fx.graph.units import Batch, bind_inputs
from dmq_fx.metrics import prediction
from dmq_fx.quantize import distributed

__all__ = ["output_sensitivity"]


def output_sensitivity(
    gm: fx.GraphModule,
    nodes: Sequence[fx.Node],
    batches: Sequence[Batch],
    max_samples: int | None,
    probes: int = 4,
    seed: int = 0,
) -> list[torch.Tensor | None]:
    """Per node of ``gm``, the estimated ``diag(J^T J)`` of the model's output with respect to
    the node's value, for every sample of ``batches`` in order (cut at ``max_samples``, as
    :func:`dmq_fx.graph.units.capture_unit_inputs` cuts), shaped like the node's values,
    averaged over ``probes`` Gaussian probes and scaled to mean 1 over all its elements (so a
    weighted squared error keeps plain MSE's scale). None for a node the output does not
    depend on, or whose value is not a floating-point tensor per sample.

    ``gm`` runs as it is (put its quantizers in float mode for the float model's sensitivity).
    Each batch costs one forward and ``probes`` backward passes through the whole model.
    """
    if probes < 1:
        raise CalibrationError(f"output_sensitivity: probes must be >= 1, got {probes}")
    wanted = list(nodes)
    seen: dict[fx.Node, torch.Tensor] = {}

    wanted_set = set(wanted)

    class Record(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in wanted_set:
                seen[n] = value
            return value

    generator = torch.Generator().manual_seed(seed)
    per_node: list[list[torch.Tensor]] = [[] for _ in wanted]
    usable = [True] * len(wanted)
    count = 0
    for args, kwargs in batches:
        if max_samples is not None and count >= max_samples:
            break
        seen.clear()
        # every floating input requires grad, so every value computed from them is in the graph
        inputs = [
            v.detach().requires_grad_(True)
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v
            for v in bind_inputs(gm, args, kwargs)
        ]
        with torch.enable_grad():
            out = prediction(Record(gm).run(*inputs))
            if not (isinstance(out, torch.Tensor) and out.is_floating_point()):
                raise CalibrationError(
                    "output_sensitivity: the model's prediction is not a floating-point tensor"
                )
            batch = out.shape[0]
            for k, n in enumerate(wanted):
                v = seen.get(n)
                if not (
                    isinstance(v, torch.Tensor)
                    and v.requires_grad
                    and v.dim() > 0
                    and v.shape[0] == batch
                ):
                    usable[k] = False
            tracked = [seen[n] for n, ok in zip(wanted, usable) if ok]
            sums = [torch.zeros_like(t, dtype=torch.float32) for t in tracked]
            for _ in range(probes if tracked else 0):
                probe = torch.randn(out.shape, generator=generator).to(out)
                grads = torch.autograd.grad(
                    out, tracked, grad_outputs=probe, retain_graph=True, allow_unused=True
                )
                for s, g in zip(sums, grads):
                    if g is not None:
                        s += g.detach().float().pow(2)
        it = iter(sums)
        for k, ok in enumerate(usable):
            if ok:
                per_node[k].append(next(it) / probes)
        count += batch
    result: list[torch.Tensor | None] = []
    for k, chunks in enumerate(per_node):
        if not usable[k] or not chunks:
            result.append(None)
            continue
        diag = torch.cat(chunks)[:max_samples]
        total = diag.sum().double().reshape(1)
        elements = torch.tensor([diag.numel()], dtype=torch.float64, device=total.device)
        distributed.all_reduce_(total)  # one scale on every rank
        distributed.all_reduce_(elements)
        mean = float(total / elements)
        result.append(diag / mean if mean > 0 else None)
    return result
