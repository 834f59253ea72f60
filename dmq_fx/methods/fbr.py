"""EDA-DM's fine-grained block reconstruction (FBR, docs/methods/eda_dm.md) as a calibration stage.

Block by block in graph order (the units of :mod:`dmq_fx.blocks`: resnet blocks, attention and
transformer blocks, lone layers on their own), with the units before it already quantized:

- the unit's inputs are captured twice, from the float model (``x_fp``) and from the model
  quantized up to this unit (``x_q``); every training batch mixes them element by element,
  ``x_fp`` with probability ``fp_share`` (QDrop-style, 50/50 by default);
- the targets are the float model's unit outputs and the float outputs of every quantized
  layer of the unit except the last, all on ``x_fp``;
- the loss is :func:`fbr_loss`: the output error plus ``layer_weight`` (lambda_m, 0.8) times
  the sum of those layers' output errors, with each error BRECQ's squared error summed over
  channels and averaged over the rest;
- it learns the weights' AdaRound rounding (:class:`dmq_fx.methods.adaround.RoundingVariables`) and
the
  activation steps of the unit's input quantizers (LSQ: the step is a parameter of torch's
  learnable fake quantization; a PTS quantizer learns its per-tensor step ``s`` with its
  power-of-two channel factors fixed), with Adam and cosine decay, zero points fixed.

Activation quantizers with per-timestep tables keep their observed steps (EDA-DM shares one
set of activation parameters across timesteps); their layers' rounding is still learned. After
a unit is learned its quantizers stay on, so the next unit sees quantized inputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import fx
from torch.ao.quantization.fake_quantize import FakeQuantize

from dmq_fx.errors import ConfigError
from dmq_fx.graph.units import (
    CapturedInputs,
    ReconstructionUnit,
    capture_unit_inputs,
    unit_graph,
)
from dmq_fx.methods.adaround import (
    BlockReconstructionOptions,
    RoundingVariables,
    output_loss,
    require_activation_qparams,
    require_weight_qparams,
    sample_losses,
    unit_outputs,
)
from dmq_fx.observers import PowerOfTwoFakeQuantize
from dmq_fx.quantize import distributed
from dmq_fx.quantize.modes import (
    fix_quantizer_modes,
    layer_input_quantizer_names,
    layer_quantizers,
    quantizer_mode,
)
from dmq_fx.quantize.stage import Batch, CalibrationContext

__all__ = ["FBR", "LearnedStepFakeQuantize", "fbr_loss", "mix_inputs"]


def fbr_loss(
    outputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    layer_outputs: Sequence[torch.Tensor] = (),
    layer_targets: Sequence[torch.Tensor] = (),
    layer_weight: float = 0.8,
    relative: bool = False,
    per_sample: bool = False,
    output_weights: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """FBR's loss: ``sum_o err(o) + layer_weight * sum_l err(l)`` with ``err(a, b) =
    mean over all but dim 1 of sum over dim 1 of (a - b)^2`` (BRECQ's reconstruction error;
    ``relative``: per sample relative to the target's energy,
    :func:`dmq_fx.methods.adaround.output_loss`). ``per_sample``: the loss of each sample
    (shape ``[batch]``, its mean the scalar loss) for a per-sample weighting.
    ``output_weights``: per output, each element's squared error times it (None: 1), e.g. the
    model's output sensitivity; the layer errors stay unweighted."""
    if len(outputs) != len(targets) or len(layer_outputs) != len(layer_targets):
        raise ValueError("fbr_loss: outputs and targets differ in number")
    weights = [None] * len(outputs) if output_weights is None else list(output_weights)
    if len(weights) != len(outputs):
        raise ValueError("fbr_loss: output_weights and outputs differ in number")
    err = sample_losses if per_sample else output_loss
    loss = sum(err(p, t, relative, w) for p, t, w in zip(outputs, targets, weights))
    if layer_outputs:
        loss = loss + layer_weight * sum(
            err(p, t, relative) for p, t in zip(layer_outputs, layer_targets)
        )
    return loss


def mix_inputs(
    fp: Sequence, quantized: Sequence, fp_share: float, generator: torch.Generator
) -> list:
    """QDrop's mixing: each element of every float tensor input is taken from ``fp`` with
    probability ``fp_share``, else from ``quantized``; other inputs are taken from ``fp``."""
    out = []
    for a, b in zip(fp, quantized):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.shape == b.shape:
            # drawn on the host (the same mask on every device), moved as one bool tensor
            keep = (torch.rand(a.shape, generator=generator) < fp_share).to(a.device)
            out.append(torch.where(keep, a, b))
        else:
            out.append(a)
    return out


class LearnedStepFakeQuantize(torch.nn.Module):
    """A stand-in for an activation quantizer while FBR learns its step (LSQ).

    Quantizes as ``fake_quant`` does (its zero point and range, a PTS quantizer's channel
    factors) with the step a parameter (``torch._fake_quantize_learnable_*``: straight-through
    for the input, LSQ's gradient for the step). :meth:`write_back` stores the learned step in
    ``fake_quant.scale``, which ``convert_fx`` reads.
    """

    def __init__(self, fake_quant: FakeQuantize):
        super().__init__()
        self.fake_quant = fake_quant
        self.step = torch.nn.Parameter(fake_quant.scale.detach().float().reshape(()).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fq = self.fake_quant
        step = self.step.clamp_min(torch.finfo(torch.float32).tiny)
        zero_point = fq.zero_point.detach().float().reshape(())
        if isinstance(fq, PowerOfTwoFakeQuantize):
            axis = fq.observer.ch_axis % x.dim()
            channels = x.shape[axis]
            return torch._fake_quantize_learnable_per_channel_affine(
                x,
                step * fq.observer.channel_factors(channels).to(x.device),
                zero_point.expand(channels).contiguous(),
                axis,
                fq.quant_min,
                fq.quant_max,
                1.0,
            )
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, step.reshape(1), zero_point.reshape(1), fq.quant_min, fq.quant_max, 1.0
        )

    def write_back(self) -> None:
        with torch.no_grad():
            step = self.step.detach().clamp_min(torch.finfo(torch.float32).tiny)
            self.fake_quant.scale.copy_(step.reshape(self.fake_quant.scale.shape))


@dataclasses.dataclass
class _UnitData:
    """What FBR learns a unit from: its captured float and quantized inputs, the float targets
    (output index -> tensor), which of them are the unit's outputs and which its layers', and
    the outputs' element weights (None: unweighted)."""

    x_fp: CapturedInputs
    x_q: CapturedInputs
    targets: dict[int, torch.Tensor]
    out_idx: list[int]
    layer_idx: list[int]
    output_weights: list[torch.Tensor | None]


def _quantize_unit(gm: fx.GraphModule, unit: ReconstructionUnit) -> None:
    """Turn on the unit's activation and weight quantizers (a learned unit quantizes)."""
    for node in unit.layers:
        for q in layer_quantizers(gm, node):
            q.enable_fake_quant()


@dataclasses.dataclass
class FBR(BlockReconstructionOptions):
    """Stage: EDA-DM's fine-grained block reconstruction (see the module docstring).

    Needs activation and weight qparams (run ``observe_activations`` and ``observe_weights``
    first; the steps it learns start from them). ``iterations`` Adam steps per unit on batches
    of ``batch_size`` of at most ``max_samples`` captured samples; rounding variables at ``lr``,
    activation steps at ``step_lr``, both cosine to 0. The rounding regulariser of AdaRound
    (``reg_weight``, ``beta`` annealed after ``warmup``) pushes the rounding to 0 / 1 within a
    short CPU budget; EDA-DM's code has none (:meth:`paper`: 5000 iterations, every sample,
    ``reg_weight=0``). :meth:`long` is the 800-iteration budget of the ``dmq+eda`` preset.
    """

    iterations: int = 300
    step_lr: float = 4e-5
    layer_weight: float = 0.8
    fp_share: float = 0.5

    name: str = "fbr"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.fp_share <= 1:
            raise ConfigError(f"fbr: fp_share must be in [0, 1], got {self.fp_share}")
        if self.layer_weight < 0:
            raise ConfigError(f"fbr: layer_weight must be >= 0, got {self.layer_weight}")
        if self.capture != "restart":
            # FBR switches the quantizers in front of each unit between its two captures and
            # quantizes the unit afterwards: values a paused forward computed before would be stale
            raise ConfigError(f"fbr: capture must be 'restart', got {self.capture!r}")

    @classmethod
    def long(cls, **overrides) -> FBR:
        """800 iterations per unit (stage ``fbr_800``): the ``dmq+eda`` preset's budget, where
        LES is a large share of the calibration time and the longer FBR pays
        (benchmarks/RESULTS.md)."""
        return cls(**{**{"iterations": 800, "name": "fbr_800"}, **overrides})

    @classmethod
    def paper(cls, **overrides) -> FBR:
        """EDA-DM's budget: 5000 iterations per unit, batch 32, every sample, no regulariser."""
        paper = {"iterations": 5000, "max_samples": None, "reg_weight": 0.0, "name": "fbr_paper"}
        return cls(**{**paper, **overrides})

    def __call__(self, gm: fx.GraphModule, ctx: CalibrationContext) -> None:
        require_weight_qparams(gm, self.name)
        require_activation_qparams(gm, self.name)
        # a restored unit quantizes, as learn_unit leaves it
        self.reconstruct(gm, ctx, restored=lambda unit: _quantize_unit(gm, unit))

    def learn_unit(
        self,
        gm: fx.GraphModule,
        unit: ReconstructionUnit,
        batches: Sequence[Batch],
        *,
        seed: int,
        timesteps: torch.Tensor | None = None,
    ) -> float:
        """Reconstruct ``unit`` (its predecessors quantized); returns the last (unweighted)
        loss. Afterwards the unit's weight and activation quantizers are on. ``timesteps``:
        every captured sample's, for the adaptive timestep weighting."""
        sub, inputs, outputs = unit_graph(gm, unit, extra_outputs=unit.layers[:-1])
        names = [name for node in unit.layers for name in layer_input_quantizer_names(node)]
        with quantizer_mode(gm, "float"):
            x_fp = capture_unit_inputs(gm, inputs, batches, self.max_samples)
        for name in names:  # a quantizer in front of the unit quantizes x_q (observed step)
            gm.get_submodule(name).enable_fake_quant()
        x_q = capture_unit_inputs(gm, inputs, batches, self.max_samples)
        for name in names:
            gm.get_submodule(name).disable_fake_quant()
        targets = unit_outputs(sub, x_fp)  # the unit's own quantizers are still off
        out_idx = [i for i in targets if i < len(outputs)]
        layer_idx = [i for i in targets if i >= len(outputs)]

        sensitivity = self.unit_output_weights(gm, outputs, batches, seed)
        data = _UnitData(x_fp, x_q, targets, out_idx, layer_idx, [sensitivity[i] for i in out_idx])
        rounding = RoundingVariables.start(gm, unit.layers)
        learned = self._install_steps(gm, sub, names)
        weighting = self.sample_weighting(timesteps)
        generator = torch.Generator().manual_seed(seed)
        last = torch.tensor(math.nan)  # read once at the end: no host sync per iteration
        try:
            params = [{"params": rounding.parameters(), "lr": self.lr}]
            if learned:
                params.append({"params": [m.step for m in learned], "lr": self.step_lr})
            if (rounding.parameters() or learned) and self.iterations:
                fix_quantizer_modes(sub)
                opt = torch.optim.Adam(params)
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.iterations)
                for it in range(self.iterations):
                    loss, last = self._step(sub, data, rounding, it, generator, weighting)
                    opt.zero_grad()
                    loss.backward()
                    distributed.average_gradients(p for g in params for p in g["params"])
                    opt.step()
                    sched.step()
        finally:  # an interrupted unit keeps round-to-nearest and its observed steps
            rounding.release()
        rounding.finish()
        for module in learned:
            module.write_back()
        _quantize_unit(gm, unit)
        return float(last)

    def _step(self, sub, data: _UnitData, rounding, it, generator, weighting):
        x_fp, x_q, targets = data.x_fp, data.x_q, data.targets
        out_idx, layer_idx, output_weights = data.out_idx, data.layer_idx, data.output_weights
        n = min(self.batch_size, len(x_fp))
        idx = torch.randint(len(x_fp), (n,), generator=generator)
        mixed = mix_inputs(x_fp.select(idx), x_q.select(idx), self.fp_share, generator)
        rounding.apply_soft()
        outs = sub(*mixed)
        rec = fbr_loss(
            [outs[i] for i in out_idx],
            [targets[i][idx] for i in out_idx],
            [outs[i] for i in layer_idx],
            [targets[i][idx] for i in layer_idx],
            self.layer_weight,
            self.relative_loss,
            per_sample=weighting is not None,
            output_weights=[None if w is None else w[idx] for w in output_weights],
        )
        loss = rec
        if weighting is not None:
            loss = (weighting.weights(idx, rec) * rec).mean()
            rec = rec.mean()
        if self.reg_weight and it >= self.warmup * self.iterations:
            loss = loss + self.reg_weight * rounding.regularizer(self.beta(it))
        return loss, rec.detach()

    @staticmethod
    def _install_steps(
        gm: fx.GraphModule, sub: fx.GraphModule, names: list[str]
    ) -> list[LearnedStepFakeQuantize]:
        """Swap the unit graph's plain and PTS input quantizers for learned-step stand-ins
        (``gm`` keeps its own); table quantizers stay as they are, quantizing."""
        called = {n.target for n in sub.graph.nodes if n.op == "call_module"}
        learned = []
        for name in names:
            fq = gm.get_submodule(name)
            per_tensor = isinstance(fq, FakeQuantize) and not fq.is_per_channel
            if name in called and (per_tensor or isinstance(fq, PowerOfTwoFakeQuantize)):
                stand_in = LearnedStepFakeQuantize(fq)
                sub.set_submodule(name, stand_in)
                learned.append(stand_in)
            else:
                fq.enable_fake_quant()
        return learned
