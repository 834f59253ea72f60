"""DMQ's adaptive timestep weighting, shared by LES and block reconstruction
(docs/methods/les.md).

A diffusion UNet is calibrated on inputs from every sampling step at once. The loss of a
batch mixes samples whose errors differ by orders of magnitude between steps; DMQ weighs each
sample by ``lambda_t = (1 - Lambda_t / sum Lambda)^r`` where ``Lambda_t`` is a per-step moving
average of the batch loss, so steps holding a large share of the current loss count less and
the small errors of the other steps, which accumulate over a trajectory, are not drowned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx

from dmq_fx.graph.meta import graph_state
from dmq_fx.quantize import distributed
from dmq_fx.quantize.stage import Batch

__all__ = [
    "AdaptiveTimestepWeighting",
    "adaptive_timestep_weights",
    "batch_timesteps",
    "calibration_timesteps",
]


def adaptive_timestep_weights(running_loss: torch.Tensor, r: float = 20.0) -> torch.Tensor:
    """DMQ's lambda_t = (1 - Lambda_t / sum Lambda)^r; all ones while sum is 0.

    Steps holding a large share of the current loss are weighted down: shares of 2, 5, 10, 20%
    give 0.668, 0.358, 0.122, 0.0115 at r = 20.
    """
    total = running_loss.sum()
    # chosen on the device (a branch on ``total`` would be a host sync per iteration)
    shares = running_loss / torch.where(total > 0, total, torch.ones_like(total))
    weights = (1 - shares).clamp_min(0) ** r
    return torch.where(total > 0, weights, torch.ones_like(weights))


def batch_timesteps(gm: fx.GraphModule, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The per-sample timesteps of a calibration batch (None if the model takes none)."""
    record = graph_state(gm)
    names = record.input_names if record is not None else []
    if "timestep" in kwargs:
        t = kwargs["timestep"]
    elif "timestep" in names and names.index("timestep") < len(args):
        t = args[names.index("timestep")]
    else:
        return None
    batch = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else 1
    t = torch.as_tensor(t).reshape(-1)
    return t.expand(batch).clone() if t.numel() == 1 else t.clone()


def calibration_timesteps(
    gm: fx.GraphModule, batches: Sequence[Batch], max_samples: int | None
) -> torch.Tensor | None:
    """The timestep of every sample of ``batches`` in order, cut at ``max_samples`` as the
    captured unit inputs are (:func:`dmq_fx.graph.units.capture_unit_inputs`); None if a batch
    carries no timestep."""
    steps = [batch_timesteps(gm, args, kwargs) for args, kwargs in batches]
    if not steps or any(t is None for t in steps):
        return None
    return torch.cat([t.cpu() for t in steps])[:max_samples]


class AdaptiveTimestepWeighting:
    """The running state of :func:`adaptive_timestep_weights` over one unit's samples.

    ``timesteps`` holds every captured sample's timestep; the data's own timestep grid is
    taken from it. :meth:`weights` updates ``Lambda_t`` with a batch's per-sample losses
    (momentum ``momentum``, steps absent from the batch unchanged; summed over the ranks of a
    distributed calibration) and returns the batch's weights. With one timestep (or none) every
    weight is 1.
    """

    def __init__(self, timesteps: torch.Tensor, r: float = 20.0, momentum: float = 0.95):
        self.grid, self.index = torch.unique(timesteps, return_inverse=True)
        self.running = torch.zeros(len(self.grid), dtype=torch.float64, device=self.grid.device)
        self.r, self.momentum = r, momentum

    @property
    def active(self) -> bool:
        return len(self.grid) > 1

    def weights(self, idx: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """The weights of the samples ``idx`` (positions in ``timesteps``) whose unweighted
        losses are ``losses``, after updating the running per-step losses with them."""
        if not self.active:
            return torch.ones_like(losses)
        with torch.no_grad():
            k = self.index[idx].to(losses.device)
            running = self.running.to(losses.device)
            batch_loss = torch.zeros_like(running).index_add_(0, k, losses.detach().double())
            seen = torch.bincount(k, minlength=len(self.grid))
            distributed.all_reduce_(batch_loss)  # the same running losses on every rank
            distributed.all_reduce_(seen)
            updated = self.momentum * running + (1 - self.momentum) * batch_loss
            self.running = torch.where(seen > 0, updated, running)
            return adaptive_timestep_weights(self.running, self.r)[k].float()
