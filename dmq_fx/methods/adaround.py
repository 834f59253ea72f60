"""AdaRound: learned weight rounding, block by block (docs/methods/adaround.md).

After the weight qparams are fixed (``observe_weights`` on ``tau * W`` when LES is on), each
reconstruction unit (:mod:`dmq_fx.blocks`: resnet and transformer blocks, lone layers on their
own) learns, for every weight, whether it rounds down or up: ``floor(w / s) + h(V)`` with
AdaRound's rectified sigmoid ``h``, on the FP model's own unit inputs, to reproduce the FP unit
output (plain MSE), with activations not quantized. A regulariser ``sum(1 - |2h - 1|^beta)``
(weight ``reg_weight``, ``beta`` annealed from ``beta_start`` to ``beta_end`` after a
``warmup`` share of the iterations) pushes ``h`` to 0 or 1; the final rounding is ``V >= 0``,
stored in the weight quantizer (``GroupedWeightFakeQuantize.rounding_<g>``) and used by
``convert_fx`` for the integer weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch.ao.quantization.fake_quantize import FakeQuantize
from tqdm.auto import tqdm

from dmq_fx.errors import ConfigError
from dmq_fx.graph.meta import ANNOTATION_KEY
from dmq_fx.graph.units import (
    BLOCK_TYPES,
    CAPTURE_MODES,
    ForwardCursor,
    capture_unit_inputs,
    reconstruction_units,
    unit_graph,
)
from dmq_fx.methods.output_sensitivity import output_sensitivity
from dmq_fx.methods.timestep_weighting import (
    AdaptiveTimestepWeighting,
    calibration_timesteps,
)
from dmq_fx.passes import weight_before_quantization, weight_quantizer
from dmq_fx.quantize import distributed
from dmq_fx.quantize.modes import (
    fix_quantizer_modes,
    input_quantizers,
    quantizer_mode,
    set_quantizer_mode,
    weight_quantizers,
)
from dmq_fx.quantize.stage import Batch, CalibrationContext

__all__ = [
    "AdaRound",
    "BlockReconstructionOptions",
    "RoundingVariables",
    "annealed_beta",
    "rectified_sigmoid",
    "require_activation_qparams",
    "require_weight_qparams",
    "sample_losses",
]

#: how block reconstruction weighs the samples of different sampling steps
TIMESTEP_WEIGHTINGS = ("uniform", "adaptive")

#: AdaRound's stretch of the sigmoid to (GAMMA, ZETA) before clipping to [0, 1]
GAMMA, ZETA = -0.1, 1.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's ``h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _initial_v(rest: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = rest`` (the fractional part of ``w / s``), so learning starts at the
    float weight."""
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def unit_outputs(sub: fx.GraphModule, data, chunk: int = 256) -> dict[int, torch.Tensor]:
    """``sub``'s outputs over every captured sample, without gradients: output index -> tensor,
    for the float tensor outputs (the ones a reconstruction loss compares)."""
    with torch.no_grad():
        chunks = [sub(*data.select(slice(i, i + chunk))) for i in range(0, len(data), chunk)]
    return {
        i: torch.cat([c[i] for c in chunks])
        for i, out in enumerate(chunks[0])
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() > 0
    }


def sample_losses(
    pred: torch.Tensor,
    target: torch.Tensor,
    relative: bool = False,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`output_loss` per sample (shape ``[batch]``): its mean is ``output_loss``."""
    err = (pred - target).pow(2)
    if weight is not None:
        err = err * weight
    err = err.sum(1)
    err = err.reshape(err.shape[0], -1).mean(1)
    if not relative:
        return err
    energy = target.detach().pow(2).sum(1).reshape(err.shape[0], -1).mean(1)
    mean = energy.mean()
    # a near-zero target would take all the weight: floored at 1e-6 of the mean; an all-zero
    # batch keeps plain MSE (chosen on the device: no host sync)
    weights = mean / torch.maximum(energy, 1e-6 * mean)
    weights = torch.where(mean > 0, weights, torch.ones_like(weights))
    return err * weights


def output_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    relative: bool = False,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """BRECQ's reconstruction loss: squared error summed over dim 1, mean over the rest.

    ``weight``: each element's squared error times it (same shape as ``pred``), e.g. the
    model's output sensitivity to the element (:mod:`dmq_fx.methods.output_sensitivity`).

    ``relative``: each sample's error divided by its target's energy (the same sum and mean),
    times the batch's mean energy. Every sample then counts by its signal-to-noise ratio, not
    its absolute error: a low-energy sample (e.g. from a late, low-noise sampling step) is not
    drowned by high-energy ones; the loss keeps plain MSE's scale, so the rounding
    regulariser's weight means the same.
    """
    if relative or weight is not None:
        return sample_losses(pred, target, relative, weight).mean()
    return (pred - target).pow(2).sum(1).mean()


def annealed_beta(
    iteration: int, iterations: int, warmup: float, beta_start: float, beta_end: float
) -> float:
    """AdaRound's regulariser exponent: ``beta_start`` during the first ``warmup`` share of the
    iterations, then linear down to ``beta_end``."""
    start = warmup * iterations
    if iteration < start:
        return beta_start
    progress = (iteration - start) / max(iterations - start, 1)
    return beta_end + (beta_start - beta_end) * max(0.0, 1 - progress)


class RoundingVariables:
    """AdaRound's variables ``V`` for every weight group of some layers (shared by AdaRound and
    FBR).

    :meth:`start` initialises ``V`` so that ``h(V)`` is the fractional part of ``w / s`` (learning
    starts at the float weight) and turns the layers' weight fake quantization on;
    :meth:`apply_soft` makes the quantizers use ``h(V)`` (call it before every forward: the
    parametrization is recomputed from it); :meth:`release` goes back to hard rounding;
    :meth:`finish` stores ``V >= 0`` as the learned rounding and marks the layers "adaround".
    """

    def __init__(
        self, layers: list[fx.Node], quantizers: list, variables: list[list[torch.Tensor]]
    ):
        self.layers, self.quantizers, self.variables = layers, quantizers, variables

    @classmethod
    def start(cls, gm: fx.GraphModule, layers: list[fx.Node]) -> RoundingVariables:
        quantizers, variables = [], []
        for node in layers:
            layer = gm.get_submodule(node.target)
            grouped = weight_quantizer(layer)
            with torch.no_grad():
                vs = []
                for fq, part in zip(
                    grouped.fake_quants, grouped.split(weight_before_quantization(layer))
                ):
                    scale = fq.scale.float().reshape(-1, *([1] * (part.dim() - 1)))
                    scaled = part * (1.0 / scale)
                    vs.append(_initial_v(scaled - torch.floor(scaled)).requires_grad_(True))
            for fq in grouped.fake_quants:
                fq.enable_fake_quant()
            quantizers.append(grouped)
            variables.append(vs)
        return cls(layers, quantizers, variables)

    def parameters(self) -> list[torch.Tensor]:
        return [v for vs in self.variables for v in vs]

    def fake_quants(self) -> list:
        return [fq for grouped in self.quantizers for fq in grouped.fake_quants]

    def apply_soft(self) -> None:
        for grouped, vs in zip(self.quantizers, self.variables):
            grouped.soft_rounding = [rectified_sigmoid(v) for v in vs]

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1|^beta)`` over every weight (the last :meth:`apply_soft`'s h)."""
        return sum(
            (1 - (2 * h - 1).abs().pow(beta)).sum()
            for grouped in self.quantizers
            for h in grouped.soft_rounding
        )

    def release(self) -> None:
        for grouped in self.quantizers:
            grouped.soft_rounding = None

    def finish(self) -> None:
        for grouped, vs in zip(self.quantizers, self.variables):
            for g, v in enumerate(vs):
                grouped.set_rounding(g, v.detach() >= 0)
        for node in self.layers:
            node.meta[ANNOTATION_KEY].adaround = True


def require_weight_qparams(gm: fx.GraphModule, stage: str) -> None:
    """Raise ConfigError unless ``observe_weights`` has fixed every weight's qparams."""
    for fq in weight_quantizers(gm):
        if fq.activation_post_process.min_val.numel() == 0:
            raise ConfigError(
                f"{stage} learns the rounding under fixed weight qparams: run 'observe_weights' "
                "before it"
            )


def require_activation_qparams(gm: fx.GraphModule, stage: str) -> None:
    """Raise ConfigError unless ``observe_activations`` has recorded every activation range."""
    for q in input_quantizers(gm):
        if (
            isinstance(q, FakeQuantize)
            and not torch.isfinite(q.activation_post_process.min_val).all()
        ):
            raise ConfigError(
                f"{stage} starts from the observed activation ranges: run "
                "'observe_activations' before it"
            )


def reconstruct_units(
    gm: fx.GraphModule,
    stage: str,
    block_types: tuple[type, ...],
    ctx: CalibrationContext,
    learn: Callable[[Any, int], float],
    restored: Callable[[Any], None] | None = None,
) -> None:
    """The unit loop of block reconstruction (AdaRound, FBR): float parameters frozen, every
    quantizer off, then ``learn(unit, index)`` for each unit in graph order (tqdm), skipping the
    units a resumed calibration restored (``restored(unit)`` is called for them instead)."""
    frozen = [(p, p.requires_grad) for p in gm.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        set_quantizer_mode(gm, "float")
        units = reconstruction_units(gm, block_types)
        resume = ctx.resume
        bar = tqdm(units, desc=stage, unit="unit", disable=not ctx.progress)
        for index, unit in enumerate(bar):
            if index < resume.start:  # learned before an interruption, restored
                if restored is not None:
                    restored(unit)
                continue
            loss = learn(unit, index)
            resume.done(index, unit.layers)
            bar.set_postfix(unit=unit.name, loss=f"{loss:.4g}")
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)


@dataclasses.dataclass
class BlockReconstructionOptions:
    """What AdaRound and FBR share: the Adam budget per unit (``iterations``, ``batch_size``,
    ``lr`` of the rounding variables), AdaRound's rounding regulariser (``reg_weight`` times
    ``sum(1 - |2h - 1|^beta)``, ``beta`` from ``beta_start`` to ``beta_end`` after a ``warmup``
    share of the iterations), at most ``max_samples`` captured samples per unit, the seed
    (unit ``i`` uses ``seed + i``), the module types reconstructed as one block, and how a
    unit's inputs are captured (``capture``: ``"restart"``, a forward per unit that stops at
    it, or ``"cursor"``, one forward in all paused at each unit, :class:`ForwardCursor`: same
    result, faster on large UNets, more memory), and whether the loss weighs each sample by
    its error relative to its target's energy (``relative_loss``, :func:`output_loss`), and
    how samples of different sampling steps are weighed (``timestep_weighting``: ``"uniform"``,
    or ``"adaptive"``, DMQ's weighting of LES applied to the reconstruction loss,
    :class:`~dmq_fx.methods.timestep_weighting.AdaptiveTimestepWeighting` with ``r`` and
    ``momentum``, reset for every unit), and whether each element of a unit's output error is
    weighed by how much it moves the float model's output (``output_sensitivity``,
    :func:`~dmq_fx.methods.output_sensitivity.output_sensitivity` with ``sensitivity_probes``
    probes, computed for every unit before it is learned)."""

    iterations: int = 500
    batch_size: int = 32
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    max_samples: int | None = 512
    seed: int = 0
    #: each sample's error relative to its target's energy (:func:`output_loss`)
    relative_loss: bool = False
    #: "uniform" or "adaptive" (DMQ's per-timestep weights, as in LES)
    timestep_weighting: str = "uniform"
    r: float = 20.0
    momentum: float = 0.95
    #: weigh the unit's output error by the model output's sensitivity to each element
    output_sensitivity: bool = False
    sensitivity_probes: int = 4
    block_types: tuple[type, ...] = BLOCK_TYPES
    capture: str = "restart"
    #: the stage's name (calibrate's table, checkpoints, messages)
    name: str = "block reconstruction"

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.batch_size < 1:
            raise ConfigError(f"{self.name}: iterations must be >= 0 and batch_size >= 1")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"{self.name}: warmup must be in [0, 1), got {self.warmup}")
        if self.capture not in CAPTURE_MODES:
            raise ConfigError(
                f"{self.name}: capture must be one of {CAPTURE_MODES}, got {self.capture!r}"
            )
        if self.sensitivity_probes < 1:
            raise ConfigError(
                f"{self.name}: sensitivity_probes must be >= 1, got {self.sensitivity_probes}"
            )
        if self.timestep_weighting not in TIMESTEP_WEIGHTINGS:
            raise ConfigError(
                f"{self.name}: timestep_weighting must be one of {TIMESTEP_WEIGHTINGS}, "
                f"got {self.timestep_weighting!r}"
            )

    def beta(self, iteration: int) -> float:
        """The regulariser exponent at ``iteration`` (:func:`annealed_beta`)."""
        return annealed_beta(
            iteration, self.iterations, self.warmup, self.beta_start, self.beta_end
        )

    def sample_weighting(self, timesteps: torch.Tensor | None) -> AdaptiveTimestepWeighting | None:
        """A unit's fresh timestep weighting (None: every sample weighs the same)."""
        if timesteps is None:
            return None
        return AdaptiveTimestepWeighting(timesteps, self.r, self.momentum)

    def unit_output_weights(
        self,
        gm: fx.GraphModule,
        outputs: Sequence[fx.Node],
        batches: Sequence[Batch],
        seed: int,
    ) -> list[torch.Tensor | None]:
        """Per output node of a unit, the float model's output sensitivity to each element of
        it over the captured samples (None: unweighted; every entry None unless
        ``output_sensitivity``)."""
        if not self.output_sensitivity:
            return [None] * len(outputs)
        with quantizer_mode(gm, "float"):
            return output_sensitivity(
                gm, outputs, batches, self.max_samples, self.sensitivity_probes, seed
            )

    def reconstruct(
        self,
        gm: fx.GraphModule,
        ctx: CalibrationContext,
        restored: Callable[[Any], None] | None = None,
    ) -> None:
        """Run :func:`reconstruct_units` with this stage's ``learn_unit`` (unit ``i``: seed + i;
        with ``capture="cursor"`` one :class:`ForwardCursor` serves every unit)."""
        extra = {}
        batches, seed = ctx.batches, ctx.seed_or(self.seed)
        if self.capture == "cursor":
            extra["cursor"] = ForwardCursor(gm, batches, self.max_samples)
        if self.timestep_weighting == "adaptive":
            timesteps = calibration_timesteps(gm, batches, self.max_samples)
            if timesteps is None:
                raise ConfigError(
                    f"{self.name}: timestep_weighting='adaptive' needs the timestep of every "
                    "calibration sample, and a batch carries none"
                )
            extra["timesteps"] = timesteps
        reconstruct_units(
            gm,
            self.name,
            self.block_types,
            ctx,
            lambda unit, index: self.learn_unit(gm, unit, batches, seed=seed + index, **extra),
            restored=restored,
        )


@dataclasses.dataclass
class AdaRound(BlockReconstructionOptions):
    """Stage that learns every quantized weight's rounding, unit by unit in graph order.

    Needs weight qparams (run ``observe_weights`` first). For each unit: capture its FP inputs
    (up to ``max_samples``), compute the FP outputs, then ``iterations`` Adam steps (``lr``,
    cosine to 0) on the rounding variables of the unit's layers, batches of ``batch_size``
    samples. The defaults are a CPU budget (500 iterations at lr 1e-2); :meth:`paper` gives
    DMQ's (20000 iterations at lr 1e-3, every sample).
    """

    name: str = "adaround"

    @classmethod
    def paper(cls, **overrides) -> AdaRound:
        """DMQ's budget: 20000 iterations per unit at lr 1e-3, batch 32, every sample."""
        paper = {"iterations": 20000, "lr": 1e-3, "max_samples": None, "name": "adaround_paper"}
        return cls(**{**paper, **overrides})

    def __call__(self, gm: fx.GraphModule, ctx: CalibrationContext) -> None:
        require_weight_qparams(gm, self.name)
        self.reconstruct(gm, ctx)

    def learn_unit(
        self,
        gm: fx.GraphModule,
        unit,
        batches: Sequence[Batch],
        *,
        seed: int,
        cursor: ForwardCursor | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> float:
        """Learn the rounding of ``unit``'s layers; returns the final reconstruction loss
        (unweighted). ``timesteps``: every captured sample's, for the adaptive weighting."""
        sub, inputs, outputs = unit_graph(gm, unit)
        at = (cursor, unit.nodes[0]) if cursor is not None else None
        data = capture_unit_inputs(gm, inputs, batches, self.max_samples, at)
        targets = unit_outputs(sub, data)
        kept = list(targets)
        sensitivity = self.unit_output_weights(gm, outputs, batches, seed)
        rounding = RoundingVariables.start(gm, unit.layers)
        weighting = self.sample_weighting(timesteps)
        generator = torch.Generator().manual_seed(seed)
        last = torch.tensor(math.nan)  # read once at the end: no host sync per iteration
        try:
            if rounding.parameters() and self.iterations:
                fix_quantizer_modes(sub)
                opt = torch.optim.Adam(rounding.parameters(), lr=self.lr)
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.iterations)
                for it in range(self.iterations):
                    n = min(self.batch_size, len(data))
                    idx = torch.randint(len(data), (n,), generator=generator)
                    rounding.apply_soft()
                    outs = sub(*data.select(idx))
                    weights = [
                        None if sensitivity[i] is None else sensitivity[i][idx] for i in kept
                    ]
                    if weighting is None:
                        rec = sum(
                            output_loss(outs[i], targets[i][idx], self.relative_loss, w)
                            for i, w in zip(kept, weights)
                        )
                        loss = rec
                    else:
                        per_sample = sum(
                            sample_losses(outs[i], targets[i][idx], self.relative_loss, w)
                            for i, w in zip(kept, weights)
                        )
                        rec = per_sample.mean()
                        loss = (weighting.weights(idx, per_sample) * per_sample).mean()
                    if it >= self.warmup * self.iterations:
                        loss = loss + self.reg_weight * rounding.regularizer(self.beta(it))
                    opt.zero_grad()
                    loss.backward()
                    distributed.average_gradients(rounding.parameters())
                    opt.step()
                    sched.step()
                    last = rec.detach()
        finally:  # an interrupted unit keeps round-to-nearest
            rounding.release()
            for fq in rounding.fake_quants():  # AdaRound learns the next units on float inputs
                fq.disable_fake_quant()
        rounding.finish()
        return float(last)
