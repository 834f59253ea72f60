"""Output-matched tuning of the parameters a quantized graph keeps in float
(docs/methods/float_tuning.md).

Block reconstruction (AdaRound, FBR) fixes every integer weight and activation step one unit at
a time, each unit against its own float output. What is left float in the lowered graph, the
biases of the conv and linear layers and the affine parameters of the normalization layers, can
still move, and moving it changes nothing in the integer kernels. This stage learns those few
parameters (a few thousand on a small UNet) with every quantizer on, against the float model's
prediction on the calibration batches: the whole graph, end to end, so that what one unit's
rounding error leaves for the next is corrected where it lands.

The loss is ``mean_i log(err_i)``, ``err_i`` the mean squared error of sample ``i``'s
prediction: the gradient weighs each sample by its own error's inverse, as the per-step SQNR in
dB does, so the nearly noise-free last sampling steps (the smallest predictions, the lowest
SQNR) are not drowned by the others. ``loss="mse"`` is the plain mean.

Under classifier-free guidance a sampler does not use either half's prediction but
``u + g (c - u)``: with ``g`` = 4 an error the two halves do not share is amplified fourfold.
``guidance_scale=g`` measures the error there, on batches of guidance pairs
(``CalibrationData.batches(guidance_pairs=True)``).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import fx
from tqdm.auto import tqdm

from dmq_fx.errors import ConfigError
from dmq_fx.graph.meta import graph_state
from dmq_fx.methods.adaround import require_activation_qparams, require_weight_qparams
from dmq_fx.metrics import prediction
from dmq_fx.quantize import distributed
from dmq_fx.quantize.modes import fix_quantizer_modes, quantizer_mode
from dmq_fx.quantize.stage import CalibrationContext

__all__ = ["PARAMETER_KINDS", "TuneFloatParameters", "float_parameters"]

#: which float parameters the stage may tune, by kind
PARAMETER_KINDS = ("bias", "norm")
LOSSES = ("log", "mse")

_LAYERS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def float_parameters(gm: fx.GraphModule, kinds: tuple[str, ...]) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``kinds`` among the modules ``gm`` calls, by qualified name: ``"bias"``,
    the bias of every conv and linear layer; ``"norm"``, the weight and bias of every GroupNorm
    and LayerNorm with affine parameters."""
    out: dict[str, torch.nn.Parameter] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        names = []
        if "bias" in kinds and isinstance(module, _LAYERS):
            names = ["bias"]
        elif "norm" in kinds and isinstance(module, _NORMS):
            names = ["weight", "bias"]
        for attr in names:
            p = module._parameters.get(attr)
            if isinstance(p, torch.nn.Parameter):
                out[f"{node.target}.{attr}"] = p
    return out


def _sample_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).reshape(pred.shape[0], -1).mean(1)


def _guided(pred: torch.Tensor, scale: float) -> torch.Tensor:
    uncond, cond = pred.chunk(2)
    return uncond + scale * (cond - uncond)


def check_guidance_pairs(batches: list, stage: str) -> None:
    """Every batch a guidance pair batch: an even row count and both halves on the same
    samples and timesteps (the unconditional half first, as a pipeline calls the UNet)."""
    for i, (args, kwargs) in enumerate(batches):
        sample = args[0] if args else kwargs.get("sample")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        rows = sample.shape[0] if isinstance(sample, torch.Tensor) else 0
        same = rows > 0 and rows % 2 == 0 and torch.equal(*sample.chunk(2))
        if same and isinstance(timestep, torch.Tensor) and timestep.dim() > 0:
            same = torch.equal(*timestep.chunk(2))
        if not same:
            raise ConfigError(
                f"{stage}: guidance_scale > 1 needs batches of guidance pairs (unconditional "
                f"rows, then the conditional rows of the same samples: "
                f"CalibrationData.batches(guidance_pairs=True)); batch {i}'s {rows} rows are not"
            )


@dataclasses.dataclass
class TuneFloatParameters:
    """Stage: tune the float parameters of ``parameters`` kinds (:data:`PARAMETER_KINDS`) so the
    quantized graph's prediction matches the float model's on the calibration batches.

    Runs last, once the quantizers are fixed (it needs observed activation and weight qparams).
    ``iterations`` Adam steps at ``lr``, cosine to 0, each on one calibration batch drawn at
    random (``seed``); ``loss``: ``"log"`` (each sample by its own error, see the module
    docstring) or ``"mse"``; ``guidance_scale`` > 1: the error of the classifier-free guided
    prediction, on batches of guidance pairs (the module docstring). The tuned parameters are
    part of the graph's learned state: ``save``, checkpoints and ``convert_fx`` carry them; the
    float model keeps its own. Interrupted, the graph keeps the parameters it had.
    """

    iterations: int = 300
    lr: float = 1e-3
    parameters: tuple[str, ...] = PARAMETER_KINDS
    loss: str = "log"
    guidance_scale: float = 1.0
    seed: int = 0

    name: str = "tune_float_params"

    def __post_init__(self) -> None:
        self.parameters = tuple(self.parameters)
        unknown = [k for k in self.parameters if k not in PARAMETER_KINDS]
        if unknown or not self.parameters:
            raise ConfigError(
                f"{self.name}: parameters must be a non-empty choice of {PARAMETER_KINDS}, "
                f"got {self.parameters!r}"
            )
        if self.iterations < 0:
            raise ConfigError(f"{self.name}: iterations must be >= 0, got {self.iterations}")
        if not self.lr > 0:
            raise ConfigError(f"{self.name}: lr must be > 0, got {self.lr}")
        if self.loss not in LOSSES:
            raise ConfigError(f"{self.name}: loss must be one of {LOSSES}, got {self.loss!r}")
        if not self.guidance_scale >= 1.0:
            raise ConfigError(
                f"{self.name}: guidance_scale must be >= 1 (1: no guidance), "
                f"got {self.guidance_scale}"
            )

    def __call__(self, gm: fx.GraphModule, ctx: CalibrationContext) -> None:
        require_weight_qparams(gm, self.name)
        require_activation_qparams(gm, self.name)
        params = float_parameters(gm, self.parameters)
        if not params or not self.iterations:
            return
        batches = ctx.batches
        if self.guidance_scale > 1.0:
            check_guidance_pairs(batches, self.name)
        with torch.no_grad(), quantizer_mode(gm, "float"):
            targets = [self._output(gm(*args, **kwargs)).detach() for args, kwargs in batches]
        saved = {name: p.detach().clone() for name, p in params.items()}
        frozen = [(p, p.requires_grad) for p in gm.parameters()]
        try:
            for p, _ in frozen:
                p.requires_grad_(False)
            for p in params.values():
                p.requires_grad_(True)
            with quantizer_mode(gm, "simulate"):
                self._learn(gm, list(params.values()), batches, targets, ctx)
        except BaseException:
            with torch.no_grad():  # nothing half-tuned stays behind
                for name, p in params.items():
                    p.copy_(saved[name])
            raise
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
        record = graph_state(gm)
        if record is not None:
            record.tuned_parameters = sorted({*record.tuned_parameters, *params})

    def _output(self, out) -> torch.Tensor:
        pred = prediction(out)
        return _guided(pred, self.guidance_scale) if self.guidance_scale > 1.0 else pred

    def _learn(self, gm, params, batches, targets, ctx: CalibrationContext) -> None:
        # a copy of the graph whose quantizers keep the mode they have now (no per-call flag
        # reads); its modules are gm's own, so the parameters learned are gm's
        run = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        fix_quantizer_modes(run)
        opt = torch.optim.Adam(params, lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.iterations)
        generator = torch.Generator().manual_seed(ctx.seed_or(self.seed))
        bar = tqdm(range(self.iterations), desc=self.name, disable=not ctx.progress)
        for it in bar:
            b = int(torch.randint(len(batches), (1,), generator=generator))
            args, kwargs = batches[b]
            err = _sample_errors(self._output(run(*args, **kwargs)), targets[b])
            if self.loss == "log":
                # floored so that an exact sample contributes a finite term
                loss = torch.log(err + 1e-12 * targets[b].pow(2).mean()).mean()
            else:
                loss = err.mean()
            opt.zero_grad()
            loss.backward()
            distributed.average_gradients(params)
            opt.step()
            sched.step()
            if it % 50 == 0 or it == self.iterations - 1:  # one host sync per 50 steps
                bar.set_postfix(loss=f"{loss.item():.4g}")
        if not all(math.isfinite(float(p.detach().abs().max())) for p in params):
            raise FloatingPointError(f"{self.name}: a tuned parameter is not finite")
