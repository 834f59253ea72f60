"""Resumable calibration: ``calibrate(..., checkpoint_dir=...)``.

What a calibration has learned goes to ``checkpoint_dir`` as it goes: after every finished
stage the whole learned state (:func:`dmq_fx.workflow.serialization.learned_state`), after every
finished
unit of a unit-wise stage (``learn_les``, ``adaround``, ``fbr``: one layer or block at a time)
that unit's quantizer and LES tensors. Each file is written to a temporary name and renamed, so
an interruption at any moment (KeyboardInterrupt, a killed process) leaves only complete files;
``progress.json`` (written last, the same way) says how far the run got. Calling ``calibrate``
again with the same stages, data and folder on a freshly prepared graph restores that state
and continues from the first unfinished unit; units are seeded by their index and the state
they depend on is restored exactly, so the result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import fx

from dmq_fx.errors import CalibrationError
from dmq_fx.graph.meta import ANNOTATION_KEY, quantized_layer_nodes
from dmq_fx.quantize import distributed
from dmq_fx.quantize.stage import UnitProgress
from dmq_fx.quantize.state import assign_state, learned_state

__all__ = ["CalibrationCheckpoint"]

FORMAT = "dmq_fx.calibration-checkpoint/2"


def _data_digest(stage_names: Sequence[str], batches: Sequence) -> str:
    h = hashlib.sha256(json.dumps(list(stage_names)).encode())
    for args, kwargs in batches:
        for value in [*args, *kwargs.values()]:
            if isinstance(value, torch.Tensor):
                d = value.detach().double()
                h.update(f"{tuple(value.shape)}:{d.sum().item():.17g}".encode())
            else:
                h.update(repr(value).encode())
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write to a temporary name, then rename; with torch.distributed rank 0 writes and the
    others wait for it."""
    if distributed.is_writer():
        tmp = path.with_name(path.name + ".tmp")
        write(str(tmp))
        os.replace(tmp, path)
    distributed.barrier()


def _unit_modules(layers: Sequence[fx.Node]) -> tuple[str, ...]:
    """Module name prefixes of what a unit's learning changes: everything under its layers
    (weight quantizers with roundings, the LES scale reached through the weight's
    parametrization) and their input quantizers."""
    return tuple(p for n in layers for p in (f"{n.target}.", f"{n.target}_input_quant"))


class CalibrationCheckpoint:
    """The checkpoint folder of one ``calibrate`` call (see the module docstring)."""

    def __init__(self, folder: str | Path, stage_names: Sequence[str], batches: Sequence):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.digest = _data_digest(stage_names, batches)
        self.progress = {"format": FORMAT, "digest": self.digest, "stage": 0, "units": 0}
        path = self.folder / "progress.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("format") != FORMAT or saved.get("digest") != self.digest:
                raise CalibrationError(
                    f"checkpoint_dir {self.folder} holds a calibration of other stages or data; "
                    "use an empty folder (or the same stages and data to resume)"
                )
            self.progress = saved

    @property
    def start_stage(self) -> int:
        return int(self.progress["stage"])

    @property
    def start_unit(self) -> int:
        return int(self.progress["units"])

    def restore(self, gm: fx.GraphModule) -> None:
        """Put the saved state into a freshly prepared ``gm``."""
        stage, units = self.start_stage, self.start_unit
        files = [self.folder / f"stage_{stage - 1}.safetensors"] if stage else []
        files += [self.folder / f"stage_{stage}_unit_{u}.safetensors" for u in range(units)]
        for path in files:
            tensors = load_file(str(path))
            assign_state(gm, tensors)
            with safe_open(str(path), "pt") as f:  # the layers the stages marked "adaround"
                marked = set(json.loads(f.metadata()["adaround"]))
            for node in quantized_layer_nodes(gm):
                if str(node.target) in marked:
                    node.meta[ANNOTATION_KEY].adaround = True

    def _write(self, path: Path, tensors: dict, gm: fx.GraphModule) -> None:
        marked = [
            str(n.target) for n in quantized_layer_nodes(gm) if n.meta[ANNOTATION_KEY].adaround
        ]
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        meta = {"format": FORMAT, "adaround": json.dumps(marked)}
        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    def _set_progress(self, stage: int, units: int) -> None:
        self.progress.update(stage=stage, units=units)
        text = json.dumps(self.progress)
        _atomic_write(self.folder / "progress.json", lambda tmp: Path(tmp).write_text(text))

    def unit_done(self, stage: int, gm: fx.GraphModule, index: int, layers) -> None:
        prefixes = _unit_modules(layers)
        state = learned_state(gm, lambda name: name.startswith(prefixes))
        self._write(self.folder / f"stage_{stage}_unit_{index}.safetensors", state, gm)
        self._set_progress(stage, index + 1)

    def stage_done(self, stage: int, gm: fx.GraphModule) -> None:
        self._write(self.folder / f"stage_{stage}.safetensors", learned_state(gm), gm)
        self._set_progress(stage + 1, 0)
        if distributed.is_writer():
            for path in self.folder.glob(f"stage_{stage}_unit_*.safetensors"):
                path.unlink()
            previous = self.folder / f"stage_{stage - 1}.safetensors"
            if stage and previous.exists():
                previous.unlink()
        distributed.barrier()

    def unit_progress(self, stage: int, gm: fx.GraphModule) -> UnitProgress:
        """What stage ``stage`` of this calibration gets as ``ctx.resume``."""
        start = self.start_unit if stage == self.start_stage else 0
        return UnitProgress(start, functools.partial(self.unit_done, stage, gm))
