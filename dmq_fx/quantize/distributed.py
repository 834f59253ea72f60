"""Data-parallel calibration on ``torch.distributed``.

Launch one process per device with ``torchrun``, call ``torch.distributed.init_process_group``
(``gloo`` on CPU, ``nccl`` on GPUs), prepare the same model on every rank and call
:func:`dmq_fx.calibrate` with each rank's own shard of the calibration data. The stages then
combine the ranks:

- ``observe_activations``: every activation range is the min / max over the ranks' ranges;
- ``vote_pts``: the votes (and summed errors) of all ranks are added before the decision;
- ``smoothquant``: ``max|X_c|`` over all ranks;
- ``learn_les``, ``adaround``, ``fbr``: gradients are averaged over the ranks after every
  backward (the same seed draws the same batch positions on every rank's shard), and LES's
  per-timestep running losses are summed, so every rank holds the same parameters throughout;
- with ``checkpoint_dir`` only rank 0 writes (the folder must be shared), the others wait.

Every rank ends with the same calibrated graph; rank 0 saves it (:func:`dmq_fx.save`). Without an
initialised process group (or with one rank) every function here does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from dmq_fx.errors import ConfigError
from dmq_fx.observers import TimestepTableFakeQuantize

__all__ = [
    "active",
    "all_reduce_",
    "average_gradients",
    "barrier",
    "is_writer",
    "sync_activation_ranges",
    "sync_votes",
    "use_group",
]

# the process group of the running calibrate() call (None: the default group); a context
# variable, so that two calibrations in two threads do not see each other's group
_GROUP: contextvars.ContextVar[Any] = contextvars.ContextVar("dmq_fx_process_group", default=None)


@contextlib.contextmanager
def use_group(group: Any) -> Iterator[None]:
    """Combine over ``group`` (a ``torch.distributed`` process group; None: the default one)
    inside the ``with`` block."""
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(_GROUP.get()) > 1


def is_writer() -> bool:
    """True on the rank that writes files (rank 0, or the only process)."""
    return not active() or dist.get_rank(_GROUP.get()) == 0


def barrier() -> None:
    if active():
        dist.barrier(group=_GROUP.get())


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over the ranks: ``op`` is ``"sum"``, ``"min"`` or ``"max"``."""
    if active():
        reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=reduce_op[op], group=_GROUP.get())
    return tensor


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its mean over the ranks."""
    if not active():
        return
    world = dist.get_world_size(_GROUP.get())
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=_GROUP.get())
            p.grad /= world


def sync_activation_ranges(quantizers: Iterable) -> None:
    """Min / max of every activation observer over the ranks, then the quantizers' qparams
    from the combined range."""
    if not active():
        return
    for q in quantizers:
        if isinstance(q, TimestepTableFakeQuantize):
            raise ConfigError(
                "per-timestep activation tables are not supported with torch.distributed yet: "
                "each rank sees other timesteps; calibrate them in one process"
            )
        obs = q.activation_post_process
        all_reduce_(obs.min_val, "min")
        all_reduce_(obs.max_val, "max")
        scale, zero_point = q.calculate_qparams()
        q.scale.resize_(scale.shape).copy_(scale)
        q.zero_point.resize_(zero_point.shape).copy_(zero_point)


def sync_votes(observers: Iterable) -> None:
    """Add the PTS votes and summed errors of all ranks (before ``finish_voting``)."""
    if not active():
        return
    for obs in observers:
        all_reduce_(obs.votes, "sum")
        all_reduce_(obs.summed_errors, "sum")
