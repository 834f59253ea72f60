"""The stage protocol: what ``calibrate`` runs, and the one object a stage is called with.

A stage is any object with a ``name`` (its registry and checkpoint name) that is called as
``stage(prepared, ctx)`` with a :class:`CalibrationContext`. A plain callable
``fn(prepared, batches, progress)`` is accepted too (:func:`as_stage` wraps it, named by its
``__name__``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import fx

from dmq_fx.errors import CalibrationError, ConfigError
from dmq_fx.graph.units import Batch

__all__ = [
    "Batch",
    "CalibrationContext",
    "FunctionStage",
    "Stage",
    "UnitProgress",
    "as_stage",
    "normalize_batch",
]


@dataclasses.dataclass(frozen=True)
class UnitProgress:
    """Where a unit-wise stage (one layer or block at a time) starts, and whom it tells: skip
    units before ``start``; call ``done(index, layer_nodes)`` after each finished unit."""

    start: int = 0
    done: Callable[[int, Sequence[fx.Node]], None] = lambda index, layers: None


@dataclasses.dataclass(frozen=True)
class CalibrationContext:
    """Everything a stage gets besides the graph.

    ``batches``: the calibration batches, normalised; ``progress``: show tqdm bars;
    ``resume``: the unit to start from and the per-unit callback (a checkpointed calibration);
    ``seed``: when set, overrides the stage's own seed; ``group``: the ``torch.distributed``
    process group the ranks combine over (None: the default group, if one is initialised).
    """

    batches: Sequence[Batch]
    progress: bool = True
    resume: UnitProgress = UnitProgress()
    seed: int | None = None
    group: Any = None

    def seed_or(self, default: int) -> int:
        return default if self.seed is None else self.seed


@runtime_checkable
class Stage(Protocol):
    """A calibration stage: ``name`` and ``__call__(prepared, ctx)``."""

    name: str

    def __call__(self, prepared: fx.GraphModule, ctx: CalibrationContext) -> None: ...


@dataclasses.dataclass(frozen=True)
class FunctionStage:
    """A stage made of a function ``fn(prepared, ctx)`` (the base stages) or, with
    ``legacy=True``, of a plain callable ``fn(prepared, batches, progress)``."""

    name: str
    fn: Callable[..., None]
    legacy: bool = False

    def __call__(self, prepared: fx.GraphModule, ctx: CalibrationContext) -> None:
        if self.legacy:
            self.fn(prepared, ctx.batches, ctx.progress)
        else:
            self.fn(prepared, ctx)


def as_stage(stage: Any) -> Stage:
    """``stage`` as a :class:`Stage`: objects with a ``name`` pass through; other callables are
    called ``stage(prepared, batches, progress)`` and named by ``__name__``."""
    if isinstance(stage, Stage) and isinstance(getattr(stage, "name", None), str):
        return stage
    if callable(stage):
        return FunctionStage(getattr(stage, "__name__", repr(stage)), stage, legacy=True)
    raise ConfigError(f"calibration stage {stage!r} is neither a name nor a callable")


def normalize_batch(item: Any, index: int) -> Batch:
    """One calibration item as ``(args, kwargs)``: accepts ``(args, kwargs)``, a tuple, a tensor."""
    if (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], (tuple, list))
        and isinstance(item[1], dict)
    ):
        args, kwargs = tuple(item[0]), dict(item[1])
    elif isinstance(item, (tuple, list)):
        args, kwargs = tuple(item), {}
    elif isinstance(item, torch.Tensor):
        args, kwargs = (item,), {}
    else:
        raise CalibrationError(
            f"calibration batch {index}: expected a tuple of positional "
            f"inputs or (args, kwargs), got {type(item).__name__}"
        )
    for name, value in list(enumerate(args)) + list(kwargs.items()):
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not torch.isfinite(value).all()
        ):
            raise CalibrationError(f"calibration batch {index}: input {name!r} contains NaN or inf")
    return args, kwargs
