"""``calibrate``: an ordered list of named stages run on a prepared graph.

A stage is a callable ``stage(prepared, batches, progress)``; ``STAGES`` maps names to stages, and
a preset (``PRESETS``) is a list of names. Method modules (``dmq_fx.les``, ...) add their stages
and presets to these registries when imported (``import dmq_fx`` imports them all).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import fx
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from tqdm.auto import tqdm

from dmq_fx.errors import CalibrationError, ConfigError
from dmq_fx.graph.meta import quantized_layer_nodes
from dmq_fx.passes import input_quantizer_name, weight_before_quantization, weight_quantizer
from dmq_fx.quantize import distributed

__all__ = [
    "DEFAULT_STAGES",
    "PREPARE_FLAGS",
    "PRESETS",
    "STAGES",
    "Batch",
    "all_float",
    "calibrate",
    "input_quantizers",
    "layer_input_quantizer_names",
    "layer_quantizers",
    "weight_quantizers",
    "normalize_batch",
]

Batch = tuple[tuple[Any, ...], dict[str, Any]]
Stage = Callable[[fx.GraphModule, Sequence[Batch], bool], None]


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


def layer_input_quantizer_names(node: fx.Node) -> list[str]:
    """Qualified names of a quantized layer's activation quantizers (one per input group)."""
    n = len(node.meta["dmq_fx"].input_groups)
    return [input_quantizer_name(node.target, g, n) for g in range(n)]


def layer_quantizers(gm: fx.GraphModule, node: fx.Node) -> list[FakeQuantizeBase]:
    """A quantized layer's activation quantizers, then its weight fake quantizers."""
    inputs = [gm.get_submodule(name) for name in layer_input_quantizer_names(node)]
    return inputs + list(weight_quantizer(gm.get_submodule(node.target)).fake_quants)


def input_quantizers(gm: fx.GraphModule) -> list[FakeQuantizeBase]:
    """The activation fake quantizers of every quantized layer, in graph order."""
    return [
        gm.get_submodule(name)
        for node in quantized_layer_nodes(gm)
        for name in layer_input_quantizer_names(node)
    ]


def weight_quantizers(gm: fx.GraphModule) -> list[FakeQuantizeBase]:
    """The weight fake quantizers, one per input group of each quantized layer, in graph order."""
    return [
        fq
        for node in quantized_layer_nodes(gm)
        for fq in weight_quantizer(gm.get_submodule(node.target)).fake_quants
    ]


@contextlib.contextmanager
def all_float(gm: fx.GraphModule) -> Iterator[None]:
    """Every quantizer of ``gm`` passes float through and observes nothing; the previous
    flags come back afterwards."""
    quantizers = input_quantizers(gm) + weight_quantizers(gm)
    saved = [(bool(q.fake_quant_enabled[0]), bool(q.observer_enabled[0])) for q in quantizers]
    for q in quantizers:
        q.disable_fake_quant()
        q.disable_observer()
    try:
        yield
    finally:
        for q, (quantizing, observing) in zip(quantizers, saved):
            q.enable_fake_quant(quantizing)
            q.enable_observer(observing)


def observe_activations(gm: fx.GraphModule, batches: Sequence[Batch], progress: bool) -> None:
    """Run the batches with activation observers on and every quantizer passing float through."""
    for fq in input_quantizers(gm):
        fq.enable_observer()
        fq.disable_fake_quant()
    for fq in weight_quantizers(gm):
        fq.disable_observer()
        fq.disable_fake_quant()
    with torch.no_grad():
        for args, kwargs in tqdm(batches, desc="observe activations", disable=not progress):
            gm(*args, **kwargs)
    distributed.sync_activation_ranges(input_quantizers(gm))  # no-op in one process


def observe_weights(gm: fx.GraphModule, batches: Sequence[Batch], progress: bool) -> None:
    """Observe each weight group once and compute its qparams (the MSE search runs here).

    A learned rounding belongs to the qparams it was learned with, so it is dropped here.
    """
    nodes = quantized_layer_nodes(gm)
    with torch.no_grad():
        for node in tqdm(nodes, desc="observe weights", disable=not progress):
            layer = gm.get_submodule(node.target)
            grouped = weight_quantizer(layer)
            parts = grouped.split(weight_before_quantization(layer))
            spec = node.meta["dmq_fx"]
            spec.rewrites = [r for r in spec.rewrites if r != "adaround"]
            for g, (fq, part) in enumerate(zip(grouped.fake_quants, parts)):
                grouped.set_rounding(g, None)
                fq.enable_observer()
                fq.disable_fake_quant()
                fq(part)
                fq.disable_observer()


STAGES: dict[str, Stage] = {
    "observe_activations": observe_activations,
    "observe_weights": observe_weights,
}
#: min-max PTQ: activation ranges from the data, weight ranges by MSE grid search.
DEFAULT_STAGES: tuple[str, ...] = ("observe_activations", "observe_weights")
#: Named stage lists; dmq_fx.les adds "smoothquant", "les", "les-paper" (graphs prepared with
#: ``les=True``).
PRESETS: dict[str, tuple[str, ...]] = {"minmax": DEFAULT_STAGES}
#: The ``prepare_fx`` keyword arguments each preset's stages need (a stage that lacks its flag
#: raises ConfigError naming it): ``dmq_fx.prepare_fx(model, mapping, *ex, **PREPARE_FLAGS[p])``.
PREPARE_FLAGS: dict[str, dict[str, Any]] = {"minmax": {}}


def _enable_simulation(gm: fx.GraphModule) -> None:
    for fq in input_quantizers(gm) + weight_quantizers(gm):
        fq.disable_observer()
        fq.enable_fake_quant()


def calibrate(
    prepared: fx.GraphModule,
    data: Iterable[Any],
    stages: str | Sequence[str | Stage] = DEFAULT_STAGES,
    *,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
) -> fx.GraphModule:
    """Calibrate a graph from :func:`dmq_fx.prepare_fx` by running ``stages`` in order.

    ``data`` is an iterable of batches, each a tuple of positional inputs or ``(args, kwargs)``.
    ``stages``: a list of stage names (``STAGES``) or callables, or a preset name (``PRESETS``,
    e.g. ``"dmq"``; prepare the graph with its ``PREPARE_FLAGS``). ``checkpoint_dir``: write
    what each finished stage and unit learned there, and resume from it when called again with
    the same stages and data on a freshly prepared graph (:mod:`dmq_fx.checkpoint`).
    Afterwards ``prepared`` simulates the quantized model (fake quantization on, observers off)
    and :func:`dmq_fx.convert_fx` lowers it; calling ``calibrate`` again on it runs more stages
    on that state (``summary()`` lists every stage run, in order). Returns ``prepared``
    (calibrated in place, as torch.ao's calibration is).
    """
    state = (
        prepared.meta.get("dmq_fx", {}).get("state")
        if isinstance(prepared, fx.GraphModule)
        else None
    )
    if state not in ("prepared", "calibrated"):
        raise CalibrationError(
            "calibrate() expects the graph returned by dmq_fx.prepare_fx, got "
            + ("a converted graph" if state else type(prepared).__name__)
        )
    if isinstance(stages, str):  # a preset by name
        if stages not in PRESETS:
            raise ConfigError(f"unknown preset {stages!r}; known: {sorted(PRESETS)}")
        stages = PRESETS[stages]
    resolved = []
    for stage in stages:
        if isinstance(stage, str):
            if stage not in STAGES:
                raise ConfigError(f"unknown calibration stage {stage!r}; known: {sorted(STAGES)}")
            resolved.append((stage, STAGES[stage]))
        elif callable(stage):
            resolved.append((getattr(stage, "__name__", repr(stage)), stage))
        else:
            raise ConfigError(f"calibration stage {stage!r} is neither a name nor a callable")
    batches = [normalize_batch(item, i) for i, item in enumerate(data)]
    if not batches:
        raise CalibrationError("calibrate() got no calibration batches")
    checkpoint = None
    if checkpoint_dir is not None:
        from dmq_fx.quantize.checkpoint import CalibrationCheckpoint, UnitProgress

        checkpoint = CalibrationCheckpoint(checkpoint_dir, [n for n, _ in resolved], batches)
        checkpoint.restore(prepared)
    meta = prepared.meta["dmq_fx"]
    for index, (_, stage) in enumerate(resolved):
        if checkpoint is None:
            stage(prepared, batches, progress)
            continue
        if index < checkpoint.start_stage:
            continue
        start = checkpoint.start_unit if index == checkpoint.start_stage else 0
        meta["unit_progress"] = UnitProgress(
            start, functools.partial(checkpoint.unit_done, index, prepared)
        )
        try:
            stage(prepared, batches, progress)
        finally:
            meta.pop("unit_progress", None)
        checkpoint.stage_done(index, prepared)
    _enable_simulation(prepared)
    meta["state"] = "calibrated"
    # a later call continues the same calibration (e.g. AdaRound after a look at LES alone)
    meta["stages_run"] = [*meta.get("stages_run", []), *(name for name, _ in resolved)]
    return prepared
