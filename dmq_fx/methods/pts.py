"""Calibration stage that chooses the power-of-two channel steps of PTS layers
(docs/methods/pts.md).

Layers prepared with ``prepare_fx(..., pts="skip")`` (or ``"all"``) have
:class:`~dmq_fx.observers.PowerOfTwoFakeQuantize` input quantizers. ``vote_pts`` runs the
calibration batches in float once more, after ``observe_activations`` has fixed each tensor's
step ``s`` and zero point, and lets every sample vote for each channel's step
``s * 2^(j_c - D)`` (:class:`~dmq_fx.observers.PowerOfTwoVotingObserver`). One set of exponents is
shared by all timesteps.
"""

from __future__ import annotations

import torch
from torch import fx
from tqdm.auto import tqdm

from dmq_fx.errors import ConfigError
from dmq_fx.observers import PowerOfTwoFakeQuantize, TimestepTableFakeQuantize
from dmq_fx.quantize import distributed
from dmq_fx.quantize.modes import (
    input_quantizers,
    quantizer_mode,
    set_quantizer_mode,
)
from dmq_fx.quantize.stage import CalibrationContext, FunctionStage

__all__ = ["VOTE_PTS", "pts_quantizers", "vote_pts"]


def pts_quantizers(gm: fx.GraphModule) -> list[PowerOfTwoFakeQuantize]:
    """The power-of-two input quantizers of ``gm`` (every timestep's entry of a per-timestep
    table), in graph order."""
    out = []
    for q in input_quantizers(gm):
        entries = list(q.entries) if isinstance(q, TimestepTableFakeQuantize) else [q]
        out += [e for e in entries if isinstance(e, PowerOfTwoFakeQuantize)]
    return out


def _has_pts(q) -> bool:
    if isinstance(q, TimestepTableFakeQuantize):
        return isinstance(q.template, PowerOfTwoFakeQuantize)
    return isinstance(q, PowerOfTwoFakeQuantize)


def vote_pts(gm: fx.GraphModule, ctx: CalibrationContext) -> None:
    """Stage: count every sample's votes and fix each PTS channel's exponent (per timestep
    with per-timestep tables: each sample votes in its own timestep's entry)."""
    containers = [q for q in input_quantizers(gm) if _has_pts(q)]
    if not containers:
        raise ConfigError(
            "calibration stage 'vote_pts' chooses power-of-two steps, but the graph has no PTS "
            "layer: prepare it with dmq_fx.prepare_fx(..., pts='skip')"
        )
    quantizers = pts_quantizers(gm)
    observed = all(
        len(q.entries) for q in containers if isinstance(q, TimestepTableFakeQuantize)
    ) and all(torch.isfinite(q.observer.min_val).all() for q in quantizers)
    if not observed:
        raise ConfigError(
            "vote_pts votes on the observed activation ranges: run 'observe_activations' first"
        )
    set_quantizer_mode(gm, "float")
    for q in quantizers:
        q.observer.start_voting()
    with quantizer_mode(containers, "observe"), torch.no_grad():
        for args, kwargs in tqdm(ctx.batches, desc="vote PTS", disable=not ctx.progress):
            gm(*args, **kwargs)
    distributed.sync_votes([q.observer for q in quantizers])  # no-op in one process
    for q in quantizers:
        q.observer.finish_voting()


VOTE_PTS = FunctionStage("vote_pts", vote_pts)
