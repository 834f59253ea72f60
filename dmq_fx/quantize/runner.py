"""Running resolved calibration stages on a prepared graph: checkpoints, resume, the graph's
record of what ran, and the final switch to simulation.

Stages arrive here as :class:`~dmq_fx.quantize.stage.Stage` objects; names and presets are
resolved one layer up (:mod:`dmq_fx.methods.presets`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from torch import fx

from dmq_fx.errors import CalibrationError
from dmq_fx.graph.meta import graph_state
from dmq_fx.quantize import distributed
from dmq_fx.quantize.checkpoint import CalibrationCheckpoint
from dmq_fx.quantize.device import batches_to_device, module_device
from dmq_fx.quantize.modes import set_quantizer_mode
from dmq_fx.quantize.stage import CalibrationContext, Stage, normalize_batch

__all__ = ["check_calibratable", "run_stages"]


def check_calibratable(prepared: Any) -> None:
    """CalibrationError unless ``prepared`` comes from prepare_fx (or a calibration)."""
    record = graph_state(prepared)
    state = record.state if record is not None else None
    if state not in ("prepared", "calibrated"):
        raise CalibrationError(
            "calibrate() expects the graph returned by dmq_fx.prepare_fx, got "
            + ("a converted graph" if state else type(prepared).__name__)
        )


def run_stages(
    prepared: fx.GraphModule,
    stages: Sequence[Stage],
    data: Iterable[Any],
    *,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    seed: int | None = None,
    group: Any = None,
) -> fx.GraphModule:
    """Run ``stages`` in order on ``prepared`` (calibrated in place), each called with one
    :class:`CalibrationContext`; then every quantizer simulates and the graph is calibrated.

    The batches are moved to the graph's device once, before the first stage."""
    check_calibratable(prepared)
    batches = [normalize_batch(item, i) for i, item in enumerate(data)]
    if not batches:
        raise CalibrationError("calibrate() got no calibration batches")
    batches = batches_to_device(batches, module_device(prepared))
    with distributed.use_group(group):
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = CalibrationCheckpoint(checkpoint_dir, [s.name for s in stages], batches)
            checkpoint.restore(prepared)
        for index, stage in enumerate(stages):
            if checkpoint is None:
                stage(prepared, CalibrationContext(batches, progress, seed=seed, group=group))
                continue
            if index < checkpoint.start_stage:
                continue
            resume = checkpoint.unit_progress(index, prepared)
            stage(prepared, CalibrationContext(batches, progress, resume, seed, group))
            checkpoint.stage_done(index, prepared)
    set_quantizer_mode(prepared, "simulate")
    record = graph_state(prepared)
    record.state = "calibrated"
    # a later call continues the same calibration (e.g. AdaRound after a look at LES alone)
    record.stages_run = [*record.stages_run, *(s.name for s in stages)]
    return prepared
