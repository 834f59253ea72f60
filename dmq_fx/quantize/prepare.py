"""``prepare_fx``: trace, decide (annotate), insert quantizers."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch.ao.quantization import QConfigMapping

from dmq_fx.errors import ConfigError
from dmq_fx.graph.meta import graph_state
from dmq_fx.graph.tracing import trace
from dmq_fx.passes import insert_les_scales, insert_quantizers
from dmq_fx.quantize.annotate import annotate_quantization
from dmq_fx.quantize.device import module_device
from dmq_fx.quantize.qconfig import with_float_roles

__all__ = ["prepare_fx"]


def prepare_fx(
    model: torch.nn.Module,
    qconfig_mapping: QConfigMapping | dict[str, Any],
    example_inputs: Sequence[Any] | Any,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    split_concat_inputs: bool = True,
    les: bool = False,
    pts: str | None = None,
    pts_options: dict | None = None,
    timestep_tables: bool = False,
) -> fx.GraphModule:
    """Prepare ``model`` for post-training quantization, like torch.ao's ``prepare_fx``.

    Traces ``model`` with :func:`dmq_fx.trace` (or copies it if it already is a graph from
    ``dmq_fx.trace``), records in ``node.meta["dmq_fx"]`` which Conv2d / Linear layers are
    quantized and how (from ``qconfig_mapping``, torch.ao semantics), and inserts torch.ao
    FakeQuantize modules on their inputs and weights. The result observes activations when run;
    :func:`dmq_fx.calibrate` drives it. ``model`` is not modified.

    ``split_concat_inputs``: separate quantizers for each input of a skip concatenation
    (Q-Diffusion's shortcut split). ``les``: insert Learned Equivalent Scaling nodes (``tau = 1``,
    learned by the ``learn_les`` calibration stage or set by ``smoothquant``). ``pts="skip"``:
    channel-wise power-of-two activation steps on the skip-connection layers (``"all"``: on
    every quantized conv), chosen by the ``vote_pts`` stage; ``pts_options``: ``max_shift`` (D,
    default 3), ``kappa`` (0.85), ``selection`` (``"vote"`` or ``"mse"``). ``timestep_tables``:
    one set of activation qparams (and PTS exponents) per calibrated timestep, selected by the
    call's timestep, as in DMQ's code; off: one set shared by all timesteps.
    """
    if isinstance(qconfig_mapping, dict):
        qconfig_mapping = QConfigMapping.from_dict(qconfig_mapping)
    if not isinstance(qconfig_mapping, QConfigMapping):
        raise ConfigError(
            f"qconfig_mapping must be a torch.ao QConfigMapping, got "
            f"{type(qconfig_mapping).__name__}"
        )
    traced = graph_state(model)
    if traced is not None and traced.state is not None:
        raise ConfigError(
            f"model is already {traced.state}; prepare the float model or its dmq_fx.trace graph"
        )
    if traced is not None:
        gm = copy.deepcopy(model)
        gm.meta = copy.deepcopy(model.meta)
    else:
        gm = trace(model, example_inputs, example_kwargs)
    device = module_device(gm)  # a graph split across devices is refused here, named
    annotate_quantization(
        gm,
        with_float_roles(qconfig_mapping, graph_state(gm).unet_paths),
        split_concat_inputs=split_concat_inputs,
        les=les,
        pts=pts,
        pts_options=pts_options,
        timestep_tables=timestep_tables,
    )
    insert_quantizers(gm)
    if les:
        insert_les_scales(gm)
    gm.to(device)  # quantizers and LES scales are created on the CPU; they join the model
    record = graph_state(gm)
    record.prepare_flags = {  # recorded for dmq_fx.save / load
        "split_concat_inputs": split_concat_inputs,
        "les": les,
        "pts": pts,
        "pts_options": pts_options,
        "timestep_tables": timestep_tables,
    }
    record.state = "prepared"
    record.stages_run = []
    record.tuned_parameters = []
    return gm
