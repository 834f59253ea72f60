"""``calibrate``: run a preset or a list of stages on a prepared graph."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from torch import fx

from dmq_fx.methods.presets import DEFAULT_STAGES, Preset, resolve_stages
from dmq_fx.quantize.runner import check_calibratable, run_stages
from dmq_fx.quantize.stage import Stage

__all__ = ["calibrate"]


def calibrate(
    prepared: fx.GraphModule,
    data: Iterable[Any],
    stages: str | Preset | Sequence[str | Stage] = DEFAULT_STAGES,
    *,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    seed: int | None = None,
    group: Any = None,
) -> fx.GraphModule:
    """Calibrate a graph from :func:`dmq_fx.prepare_fx` by running ``stages`` in order.

    ``data`` is an iterable of batches, each a tuple of positional inputs or ``(args, kwargs)``.
    ``stages``: a preset name (``PRESETS``, e.g. ``"dmq"``; prepare the graph with its
    ``PREPARE_FLAGS``) or a :class:`~dmq_fx.methods.presets.Preset`, or a list of stage names
    (``STAGES``), stage objects (a ``name`` and ``__call__(prepared, ctx)``) or plain callables
    ``fn(prepared, batches, progress)``. ``checkpoint_dir``: write what each finished stage and
    unit learned there, and resume from it when called again with the same stages and data on
    a freshly prepared graph. ``seed``: overrides the stages' own seeds. ``group``: the
    ``torch.distributed`` process group the ranks combine over (None: the default one).
    Afterwards ``prepared`` simulates the quantized model (fake quantization on, observers off)
    and :func:`dmq_fx.convert_fx` lowers it; calling ``calibrate`` again on it runs more stages
    on that state (``summary()`` lists every stage run, in order). Returns ``prepared``
    (calibrated in place, as torch.ao's calibration is).
    """
    check_calibratable(prepared)
    return run_stages(
        prepared,
        resolve_stages(stages),
        data,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        seed=seed,
        group=group,
    )
