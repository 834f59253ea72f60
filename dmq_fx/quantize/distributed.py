"""Data-parallel calibration on ``torch.distributed``.

Launch one process per device with ``torchrun``, call ``torch.distributed.init_process_group``
(``gloo`` on CPU, ``nccl`` on GPUs), prepare the same model on every rank and call
:func:`dmq_fx.calibrate` with each rank's own shard of the calibration data. The stages then
combine the ranks:

- ``observe_activations``: the (min, max) each activation observer saw in each batch is
  gathered from every rank and the observers' moving averages are replayed in the order of one
  process taking the ranks' batches in turn (batch ``k`` of rank ``r`` at position
  ``k * world + r``): the ranges of a single process on the union of shards
  ``data[rank::world]``, bit for bit;
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
from torch.ao.quantization.observer import HistogramObserver

from dmq_fx.errors import ConfigError
from dmq_fx.observers import TimestepTableFakeQuantize

__all__ = [
    "active",
    "all_reduce_",
    "average_gradients",
    "barrier",
    "is_writer",
    "RangeRecorder",
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


class RangeRecorder:
    """Records, per batch, the ``(min, max)`` every activation observer computes at each call
    (``torch.aminmax`` of its input, as torch.ao's min / max observers do); in one process it
    records nothing.

    Use as ``with RangeRecorder(quantizers) as rec:`` around the batches, calling
    ``rec.next_batch()`` after each one, then :func:`sync_activation_ranges` with it.
    """

    def __init__(self, quantizers: Iterable) -> None:
        self.quantizers = list(quantizers)
        self.batches: list[list[tuple[int, torch.Tensor]]] = []
        self._current: list[tuple[int, torch.Tensor]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> RangeRecorder:
        if active():
            for i, q in enumerate(self.quantizers):
                if isinstance(q, TimestepTableFakeQuantize):
                    raise ConfigError(
                        "per-timestep activation tables are not supported with torch.distributed "
                        "yet: each rank sees other timesteps; calibrate them in one process"
                    )
                obs = q.activation_post_process
                if isinstance(obs, HistogramObserver):
                    raise ConfigError(
                        "histogram activation ranges are not supported with torch.distributed "
                        "yet: the ranks' histograms are not merged; calibrate them in one "
                        "process or use activation_ranges='minmax'"
                    )
                self._handles.append(obs.register_forward_pre_hook(self._hook(i, obs)))
        return self

    def _hook(self, index: int, observer: torch.nn.Module):
        def record(module, inputs):
            x = inputs[0].detach()
            if x.numel():
                lo, hi = torch.aminmax(x.to(observer.min_val.dtype))
                self._current.append((index, torch.stack([lo, hi]).cpu()))

        return record

    def next_batch(self) -> None:
        if self._handles:
            self.batches.append(self._current)
            self._current = []

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def sync_activation_ranges(recorder: RangeRecorder) -> None:
    """Replace every activation observer's range by that of one process observing all ranks'
    batches in turn (see the module docstring), then the quantizers' qparams from it."""
    if not active():
        return
    group = _GROUP.get()
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, recorder.batches, group=group)
    in_turn = [
        batches[k]
        for k in range(max(len(b) for b in gathered))
        for batches in gathered
        if k < len(batches)
    ]
    observers = [q.activation_post_process for q in recorder.quantizers]
    for obs in observers:
        obs.reset_min_max_vals()
    for calls in in_turn:
        for index, lo_hi in calls:
            # the observer's own update (moving average or min / max) on a tensor whose
            # aminmax is the recorded one: the same arithmetic as in one process
            observers[index](lo_hi.to(observers[index].min_val.device))
    for q in recorder.quantizers:
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
