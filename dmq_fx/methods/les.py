"""Calibration stages that set the LES vectors ``tau`` (docs/methods/les.md).

- :class:`LearnLES` (stage ``"learn_les"``; ``"learn_les_paper"`` for the paper's budget): learns
  each LES unit's ``tau`` on the FP model's own layer inputs and outputs, with only that unit
  quantized, weighted per timestep
  (:func:`dmq_fx.methods.timestep_weighting.adaptive_timestep_weights`).
- :class:`SmoothQuantScales` (stage ``"smoothquant"``): SmoothQuant's closed form
  ``tau_c = max|X_c|^alpha / max|W_c|^(1 - alpha)``, the fixed-alpha baseline.

Both need a graph prepared with ``prepare_fx(..., les=True)`` and leave the quantizers
uncalibrated: ``observe_activations`` and ``observe_weights`` follow them in a preset.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from dmq_fx.errors import CalibrationError, ConfigError
from dmq_fx.graph.meta import ANNOTATION_KEY, LayerQuantSpec
from dmq_fx.graph.units import (
    CAPTURE_MODES,
    ForwardCursor,
    ReconstructionUnit,
    inserted_inputs,
    partial_forwards,
    unit_graph,
)
from dmq_fx.methods.timestep_weighting import AdaptiveTimestepWeighting, batch_timesteps
from dmq_fx.passes import (
    LESScale,
    input_quantizer_name,
    les_scale_name,
    les_units,
    weight_quantizer,
)
from dmq_fx.quantize import distributed
from dmq_fx.quantize.modes import (
    set_quantizer_mode,
)
from dmq_fx.quantize.stage import Batch, CalibrationContext

__all__ = [
    "LearnLES",
    "SmoothQuantScales",
    "learned_taus",
]


def _capture_unit_inputs(
    gm: fx.GraphModule,
    owner: fx.Node,
    batches: Sequence[Batch],
    max_samples: int | None,
    cursor: ForwardCursor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The FP inputs of LES unit ``owner`` (before the division by tau) and their timesteps.

    Runs the graph in float mode up to the owner layer only (the forward stops there), one
    batch at a time, so only this unit's inputs are ever held; with a :class:`ForwardCursor`
    the forwards pause in front of the unit instead (:func:`_owner_inputs_from_cursor`).
    """
    raw = _owner_inputs_from_cursor(gm, owner, cursor) if cursor is not None else None
    if raw is None:
        raw = _owner_inputs_by_partial_forwards(gm, owner, batches, max_samples)
    les = gm.get_submodule(les_scale_name(owner.target))
    captured, steps = [], []
    with torch.no_grad():
        for x, (args, kwargs) in raw:
            captured.append(x * les.broadcastable(x))  # undo the current division
            t = batch_timesteps(gm, args, kwargs)
            if t is not None:
                steps.append(t)
    x = torch.cat(captured)[:max_samples]
    t = torch.cat(steps)[:max_samples] if len(steps) == len(captured) else None
    return x, t


def _owner_inputs_by_partial_forwards(
    gm: fx.GraphModule, owner: fx.Node, batches: Sequence[Batch], max_samples: int | None
) -> list[tuple[torch.Tensor, Batch]]:
    """Per batch, what the owner layer receives, each forward stopped there."""
    per_batch = partial_forwards(gm, [owner.args[0]], batches, max_samples)
    return [(values[0].detach(), batch) for values, batch in zip(per_batch, batches)]


def _owner_inputs_from_cursor(
    gm: fx.GraphModule, owner: fx.Node, cursor: ForwardCursor
) -> list[tuple[torch.Tensor, Batch]] | None:
    """Per batch, what the owner layer receives, from a cursor paused before the nodes in front
    of it (its LES division, quantizer, split cat): those depend on the tau about to be
    learned, so they run here on their own, the same ops as the forward would, and again, with
    the learned tau, when the cursor moves on. None if the cursor cannot serve this unit."""
    front = sorted(inserted_inputs(owner), key=cursor.order.__getitem__)
    if not front:
        return None
    unit = ReconstructionUnit(str(owner.target), "layer", front, [])
    sub, inputs, _ = unit_graph(gm, unit, extra_outputs=[owner.args[0]])
    per_batch = cursor.values_before(front[0], inputs)
    if per_batch is None:
        return None
    with torch.no_grad():
        return [(sub(*values)[-1], batch) for values, batch in zip(per_batch, cursor.batches)]


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _fake_quant_minmax(x: torch.Tensor, dims, qmin: int, qmax: int, symmetric: bool):
    """Round-to-nearest fake quantization with min/max from ``x`` itself (over ``dims``), with
    a straight-through rounding: gradients reach ``x`` through the data and the step."""
    dims = tuple(range(x.dim())) if dims is None else dims
    if symmetric:
        amax = x.abs().amax(dim=dims, keepdim=True)
        step = (amax / ((qmax - qmin) / 2)).clamp_min(1e-8)
        return torch.clamp(_round_ste(x / step), qmin, qmax) * step
    lo = x.amin(dim=dims, keepdim=True).clamp_max(0)
    hi = x.amax(dim=dims, keepdim=True).clamp_min(0)
    step = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
    zero = (qmin - torch.round(lo / step)).detach()
    return (torch.clamp(_round_ste(x / step) + zero, qmin, qmax) - zero) * step


class _UnitLayer:
    """One layer of an LES unit, with what its quantized forward needs."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node):
        self.spec: LayerQuantSpec = node.meta[ANNOTATION_KEY]
        self.module = gm.get_submodule(node.target)
        chain = self.module.parametrizations.weight
        self.weight = chain.original.detach()
        self.scale_weight = chain[0]  # ScaleWeightInputChannels: W -> tau * W
        self.bias = None if self.module.bias is None else self.module.bias.detach()
        self.is_conv = isinstance(self.module, torch.nn.Conv2d)
        n = len(self.spec.input_groups)
        self.act_ranges = [
            (q.quant_min, q.quant_max)
            for q in (gm.get_submodule(input_quantizer_name(node.target, g, n)) for g in range(n))
        ]
        self.weight_quantizer = weight_quantizer(self.module)
        fq0 = self.weight_quantizer.fake_quants[0]
        self.weight_range = (fq0.quant_min, fq0.quant_max)
        self.weight_symmetric = fq0.qscheme in (
            torch.per_channel_symmetric,
            torch.per_tensor_symmetric,
        )
        self.weight_per_channel = fq0.qscheme in (
            torch.per_channel_symmetric,
            torch.per_channel_affine,
        )

    def run(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        m = self.module
        if self.is_conv:
            return F.conv2d(x, weight, self.bias, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, weight, self.bias)

    def quantized(self, x_scaled: torch.Tensor) -> torch.Tensor:
        """The layer on ``x / tau`` with activations and ``tau * W`` fake-quantized (min/max)."""
        axis = 1 if self.is_conv else x_scaled.dim() - 1
        parts = torch.split(x_scaled, self.spec.input_groups, dim=axis)
        xq = torch.cat(
            [
                _fake_quant_minmax(p, None, lo, hi, symmetric=False)
                for p, (lo, hi) in zip(parts, self.act_ranges)
            ],
            dim=axis,
        )
        w = self.scale_weight(self.weight)
        dims = tuple(range(1, w.dim())) if self.weight_per_channel else None
        wq = torch.cat(
            [
                _fake_quant_minmax(p, dims, *self.weight_range, symmetric=self.weight_symmetric)
                for p in self.weight_quantizer.split(w)
            ],
            dim=1,
        )
        return self.run(xq, wq)


def _reconstruction(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample loss: sum over dim 1 of the squared error, mean over the rest (DMQ's code)."""
    err = (pred - target).pow(2).sum(1)
    return err.reshape(err.shape[0], -1).mean(1)


def _require_les(gm: fx.GraphModule, stage: str) -> dict[str, list[fx.Node]]:
    units = les_units(gm)
    if not units:
        raise ConfigError(
            f"calibration stage '{stage}' sets LES scales, but the graph has none: "
            f"prepare it with dmq_fx.prepare_fx(..., les=True)"
        )
    return units


@dataclasses.dataclass
class LearnLES:
    """Stage that learns each LES unit's ``tau`` (docs/methods/les.md, with its timestep weighting).

    For every unit (the layers sharing one ``tau``), in graph order: capture the unit's FP
    inputs over the calibration batches (up to ``max_samples``), then run ``iterations`` steps
    of Adam (``lr``, cosine to 0) on ``tau`` only, each on a random batch of ``batch_size``
    samples mixing all timesteps. The forward quantizes only this unit: ``x / tau`` per tensor
    and ``tau * W`` per output channel, min/max recomputed every step, round-to-nearest with a
    straight-through estimator. The loss is the per-sample reconstruction error of the layer's
    FP output, weighted by DMQ's adaptive timestep weights
    (:class:`~dmq_fx.methods.timestep_weighting.AdaptiveTimestepWeighting`) of a per-timestep
    moving average
    (``momentum``, reset per unit; ``weighting="uniform"`` turns it off).

    The defaults are the CPU budget (300 iterations at lr 1e-2); :meth:`paper` gives DMQ's
    (6000 iterations at lr 1e-3, batch 32). ``capture="cursor"`` takes each unit's inputs from
    one forward per batch paused in front of the unit (:class:`~dmq_fx.graph.units.ForwardCursor`):
    the same tau, without a forward per unit, for more memory.
    """

    iterations: int = 300
    batch_size: int = 32
    #: 10x the paper's 1e-3: with 1/20 of its iterations tau must still be able to move
    lr: float = 1e-2
    weighting: str = "adaptive"
    r: float = 20.0
    momentum: float = 0.95
    max_samples: int | None = 512
    seed: int = 0
    capture: str = "restart"
    #: the stage's name (calibrate's table, checkpoints, summary)
    name: str = "learn_les"

    def __post_init__(self) -> None:
        if self.weighting not in ("adaptive", "uniform"):
            raise ConfigError(f"weighting must be 'adaptive' or 'uniform', got {self.weighting!r}")
        if self.iterations < 0 or self.batch_size < 1:
            raise ConfigError("iterations must be >= 0 and batch_size >= 1")
        if self.capture not in CAPTURE_MODES:
            raise ConfigError(f"capture must be one of {CAPTURE_MODES}, got {self.capture!r}")

    @classmethod
    def paper(cls, **overrides) -> LearnLES:
        """DMQ's budget: 6000 iterations per layer at lr 1e-3, batch 32, every sample."""
        paper = {"iterations": 6000, "lr": 1e-3, "batch_size": 32, "max_samples": None}
        paper["name"] = "learn_les_paper"
        return cls(**{**paper, **overrides})

    def __call__(self, gm: fx.GraphModule, ctx: CalibrationContext) -> None:
        units = _require_les(gm, self.name)
        set_quantizer_mode(gm, "float")
        batches, progress, resume = ctx.batches, ctx.progress, ctx.resume
        cursor = None
        if self.capture == "cursor":
            cursor = ForwardCursor(gm, batches, self.max_samples)
        bar = tqdm(units.items(), desc="learn LES", unit="layer", disable=not progress)
        for index, (owner, nodes) in enumerate(bar):
            if index < resume.start:  # learned before an interruption, restored
                continue
            loss = self.learn_unit(
                gm, owner, nodes, batches, seed=ctx.seed_or(self.seed) + index, cursor=cursor
            )
            resume.done(index, nodes)
            bar.set_postfix(layer=owner, loss=f"{loss:.4g}")

    def learn_unit(
        self, gm, owner, nodes, batches, *, seed: int, cursor: ForwardCursor | None = None
    ) -> float:
        """Learn one unit's tau; returns the final (unweighted) mean reconstruction loss."""
        les: LESScale = gm.get_submodule(les_scale_name(owner))
        owner_node = next(n for n in nodes if n.target == owner)
        x_all, t_all = _capture_unit_inputs(gm, owner_node, batches, self.max_samples, cursor)
        layers = [_UnitLayer(gm, node) for node in nodes]
        with torch.no_grad():
            targets = [
                torch.cat([layer.run(x, layer.weight) for x in x_all.split(256)])
                for layer in layers
            ]
        if t_all is None:
            t_all = torch.zeros(len(x_all), dtype=torch.long, device=x_all.device)
        weighting = AdaptiveTimestepWeighting(t_all, self.r, self.momentum)
        g = torch.Generator().manual_seed(seed)
        les.tau.requires_grad_(True)
        opt = torch.optim.Adam([les.tau], lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.iterations, 1))
        last = torch.tensor(math.nan)  # read once at the end: no host sync per iteration
        for _ in range(self.iterations):
            idx = torch.randint(len(x_all), (min(self.batch_size, len(x_all)),), generator=g)
            x = x_all[idx]
            rec = sum(
                _reconstruction(layer.quantized(les(x)), target[idx])
                for layer, target in zip(layers, targets)
            )
            weights = torch.ones_like(rec)
            if self.weighting == "adaptive":
                weights = weighting.weights(idx, rec)
            loss = (weights * rec).mean()
            opt.zero_grad()
            loss.backward()
            distributed.average_gradients([les.tau])
            opt.step()
            sched.step()
            with torch.no_grad():
                les.tau.clamp_(min=1e-4)
            last = rec.detach().mean()
        les.tau.requires_grad_(False)
        return float(last)


@dataclasses.dataclass
class SmoothQuantScales:
    """Stage: SmoothQuant's fixed-alpha scales, ``tau_c = max|X_c|^a / max|W_c|^(1-a)``.

    ``max|X_c|`` over all calibration batches (one float pass with hooks on every unit),
    ``max|W_c|`` over the output channels of every layer of the unit.
    """

    alpha: float = 0.5
    name: str = "smoothquant"

    def __call__(self, gm: fx.GraphModule, ctx: CalibrationContext) -> None:
        units = _require_les(gm, self.name)
        batches, progress = ctx.batches, ctx.progress
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"smoothquant alpha must be in [0, 1], got {self.alpha}")
        set_quantizer_mode(gm, "float")
        amax: dict[str, torch.Tensor] = {}
        handles = []
        for owner in units:
            les = gm.get_submodule(les_scale_name(owner))

            def hook(module, inputs, owner=owner, les=les):
                x = inputs[0].detach() * les.broadcastable(inputs[0]).detach()
                axis = les.channel_axis % x.dim()
                dims = [d for d in range(x.dim()) if d != axis]
                m = x.abs().amax(dim=dims)
                amax[owner] = m if owner not in amax else torch.maximum(amax[owner], m)

            handles.append(gm.get_submodule(owner).register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                for args, kwargs in tqdm(batches, desc="smoothquant", disable=not progress):
                    gm(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            for owner, nodes in units.items():
                if owner not in amax:
                    raise CalibrationError(f"smoothquant: layer '{owner}' never ran")
                distributed.all_reduce_(amax[owner], "max")  # over the ranks' shards
                w_amax = torch.stack(
                    [_weight_amax_per_input_channel(gm.get_submodule(n.target)) for n in nodes]
                ).amax(0)
                tau = amax[owner].clamp_min(1e-5) ** self.alpha / w_amax.clamp_min(1e-5) ** (
                    1 - self.alpha
                )
                gm.get_submodule(les_scale_name(owner)).tau.copy_(tau)


def learned_taus(calibrated: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Each LES layer's ``tau`` (a copy), by layer name: what ``learn_les`` or ``smoothquant``
    set in a graph prepared with ``les=True``, for :func:`dmq_fx.passes.rescale_for_les`."""
    return {
        str(node.target): calibrated.get_submodule(les_scale_name(owner)).tau.detach().clone()
        for owner, nodes in les_units(calibrated).items()
        for node in nodes
    }


def _weight_amax_per_input_channel(layer: torch.nn.Module) -> torch.Tensor:
    w = layer.parametrizations.weight.original.detach().abs()
    w = w.reshape(w.shape[0], w.shape[1], -1).amax(2)  # (C_out, C_in / groups)
    groups = getattr(layer, "groups", 1)
    return w.reshape(groups, -1, w.shape[1]).amax(1).reshape(-1)
