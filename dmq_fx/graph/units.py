"""Reconstruction units of a prepared graph: blocks and lone layers, run on their own.

Block-wise reconstruction (AdaRound in DMQ, FBR in EDA-DM) learns one block at a time on the
FP model's own block inputs. On the flat FX graph a block is the contiguous run of nodes traced
inside one module of a block type (``nn_module_stack`` in ``node.meta``): a diffusers
``ResnetBlock2D``, ``BasicTransformerBlock`` or an ``Attention`` that is not inside one of them.
Quantized layers outside every block are units of their own. :func:`unit_graph` cuts a unit out
of the graph as a GraphModule sharing the layers; :func:`capture_unit_inputs` collects its FP
inputs one unit at a time (the forward stops after the unit's last input), so memory stays
bounded by one unit's activations. A :class:`ForwardCursor` trades memory for time: it keeps
each batch's forward paused at the unit and continues it for the next one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import fx

from dmq_fx.errors import CalibrationError
from dmq_fx.graph.meta import quantized_layer_nodes

__all__ = [
    "Batch",
    "partial_forwards",
    "BLOCK_TYPES",
    "CapturedInputs",
    "ForwardCursor",
    "ReconstructionUnit",
    "bind_inputs",
    "capture_unit_inputs",
    "reconstruction_units",
    "unit_graph",
]

#: one calibration batch: positional and keyword inputs of the graph
Batch = tuple[tuple[Any, ...], dict[str, Any]]

#: How unit-wise stages capture a unit's inputs: "restart" (a forward per batch per unit that
#: stops at the unit; holds one unit's inputs) or "cursor" (:class:`ForwardCursor`).
CAPTURE_MODES = ("restart", "cursor")

#: Module types reconstructed as one block (outermost wins when they nest).
BLOCK_TYPES: tuple[type, ...] = (ResnetBlock2D, BasicTransformerBlock, Attention)


@dataclasses.dataclass
class ReconstructionUnit:
    """A block (``kind="block"``, ``name`` its module path) or a lone layer (``"layer"``)."""

    name: str
    kind: str
    nodes: list[fx.Node]
    layers: list[fx.Node]


def _block_key(node: fx.Node, block_types: tuple[type, ...]) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    for key, (_, module_type) in stack.items():  # outermost first
        if isinstance(module_type, type) and issubclass(module_type, block_types):
            return key
    return None


def inserted_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes dmq_fx inserted in front of ``node`` (quantizers, LES divisions, split cats):
    its transitive inputs without ``nn_module_stack``, in no particular order."""
    out, todo = [], list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n.op != "placeholder" and not n.meta.get("nn_module_stack") and n not in out:
            out.append(n)
            todo += n.all_input_nodes
    return out


def reconstruction_units(
    gm: fx.GraphModule, block_types: tuple[type, ...] = BLOCK_TYPES
) -> list[ReconstructionUnit]:
    """The units of ``gm`` that hold quantized layers, in graph order.

    A block's nodes run from the first to the last node traced inside it (dmq_fx's own nodes
    in between included); a block whose range holds a node of another module is not
    contiguous and its layers become lone-layer units instead.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = list(gm.graph.nodes)
    keys = {n: _block_key(n, block_types) for n in nodes}
    span: dict[str, list[int]] = {}
    for n in nodes:
        if keys[n] is not None:
            span.setdefault(keys[n], [order[n], order[n]])[1] = order[n]
    units: list[ReconstructionUnit] = []
    by_block: dict[str, ReconstructionUnit] = {}
    for layer in quantized_layer_nodes(gm):
        key = keys[layer]
        if key is not None and key not in by_block:
            lo, hi = span[key]
            inside = nodes[lo : hi + 1]
            if all(keys[n] == key or not n.meta.get("nn_module_stack") for n in inside):
                by_block[key] = ReconstructionUnit(key, "block", inside, [])
                units.append(by_block[key])
            else:
                key = None
        if key is not None and key in by_block:
            by_block[key].layers.append(layer)
            continue
        own = sorted(inserted_inputs(layer) + [layer], key=order.__getitem__)
        units.append(ReconstructionUnit(str(layer.target), "layer", own, [layer]))
    return units


def unit_graph(
    gm: fx.GraphModule, unit: ReconstructionUnit, extra_outputs: Sequence[fx.Node] = ()
) -> tuple[fx.GraphModule, list, list]:
    """``unit`` as a GraphModule ``(*inputs) -> tuple(outputs)`` sharing ``gm``'s modules.

    Returns it with its input nodes (values from outside the unit, in order) and its output
    nodes (values used outside the unit) of ``gm``. ``extra_outputs`` (nodes of the unit, e.g.
    its layers for FBR's per-layer loss) are returned after the outputs. The submodules are
    ``gm``'s own, but their parents are fresh modules: replacing a submodule of the unit graph
    (``set_submodule``) leaves ``gm`` as it is.
    """
    inside = set(unit.nodes)
    inputs: list[fx.Node] = []
    for n in unit.nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in unit.nodes if any(u not in inside for u in n.users)]
    graph = fx.Graph()
    env = {a: graph.placeholder(f"input_{i}") for i, a in enumerate(inputs)}
    for n in unit.nodes:
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(tuple(env[o] for o in [*outputs, *extra_outputs]))
    return fx.GraphModule(gm, graph, class_name="ReconstructionUnit"), inputs, outputs


class StopForward(Exception):
    """Raised by a capture hook once what it needs is computed: the rest of the forward is
    skipped."""


@dataclasses.dataclass
class CapturedInputs:
    """A unit's inputs over the calibration set: per input a tensor over samples (``batched``)
    or one value shared by every batch."""

    values: list[Any]
    batched: list[bool]

    def __len__(self) -> int:
        return next(v.shape[0] for v, b in zip(self.values, self.batched) if b)

    def select(self, index: torch.Tensor | slice) -> list[Any]:
        """The inputs of the samples ``index`` (shared values as they are)."""
        return [v[index] if b else v for v, b in zip(self.values, self.batched)]


@dataclasses.dataclass
class _PausedForward:
    env: dict[fx.Node, Any]  # the values still needed downstream
    position: int  # index of the next node to run
    args: Iterator[Any]  # the placeholders' values, consumed in order


class ForwardCursor:
    """The calibration batches' forwards of ``gm``, each paused where the current unit starts.

    Capturing every unit's inputs with a forward that stops at the unit costs O(units x
    forward); a cursor runs each batch's forward once in all, continuing from where the
    previous unit paused, so a stage costs about one forward per batch plus the units' own
    learning. The price is memory: per batch it holds the forward's live values (what
    ``fx.Interpreter`` has not freed yet: the current activations and the encoder skips of a
    UNet) for every calibration sample at once. Worth it when
    the forward is costly and the calibration set small (SD-size UNets); ``"restart"`` stays
    the default. Only for stages that learn units in graph order and change nothing a unit's
    predecessors compute (LES and AdaRound, which run the graph in float throughout): values
    computed before a unit are reused after it is learned.
    """

    def __init__(self, gm: fx.GraphModule, batches: Sequence[Batch], max_samples: int | None):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.interpreter = fx.Interpreter(gm)  # its user_to_last_uses frees dead values
        self.max_samples = max_samples
        self.batches: list[Batch] = []
        count = 0
        for args, kwargs in batches:
            self.batches.append((args, kwargs))
            count += _batch_size(args)
            if max_samples is not None and count >= max_samples:
                break
        self._paused: list[_PausedForward | None] = [None] * len(self.batches)

    def values_before(self, first: fx.Node, wanted: Sequence[fx.Node]) -> list[list[Any]] | None:
        """Run each batch's forward up to (not including) node ``first`` and return, per batch,
        the values of ``wanted``; None if one of them is not live there (the caller captures
        this unit another way). A forward already past ``first`` starts over."""
        stop = self.order[first]
        out = []
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(self.batches):
                paused = self._paused[i]
                if paused is None or paused.position > stop:
                    paused = _PausedForward({}, 0, iter(bind_inputs(self.gm, args, kwargs)))
                    self._paused[i] = paused
                self._run(paused, stop)
                if any(n not in paused.env for n in wanted):
                    return None
                out.append([paused.env[n] for n in wanted])
        return out

    def _run(self, paused: _PausedForward, stop: int) -> None:
        interp = self.interpreter
        interp.env, interp.args_iter = paused.env, paused.args
        while paused.position < stop:
            node = self.nodes[paused.position]
            paused.env[node] = interp.run_node(node)
            for dead in interp.user_to_last_uses.get(node, []):
                paused.env.pop(dead, None)
            paused.position += 1


def partial_forwards(
    gm: fx.GraphModule,
    inputs: Sequence[fx.Node],
    batches: Sequence[Batch],
    max_samples: int | None,
) -> list[list[Any]]:
    """Per batch the values of ``inputs``, each batch's forward stopped once they are computed."""
    wanted = set(inputs)
    seen: dict[fx.Node, Any] = {}

    class Capture(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in wanted:
                seen[n] = value
            if len(seen) == len(wanted):
                raise StopForward
            return value

    interp = Capture(gm)
    per_batch = []
    count = 0
    with torch.no_grad():
        for args, kwargs in batches:
            seen.clear()
            with contextlib.suppress(StopForward):
                interp.run(*bind_inputs(gm, args, kwargs))
            if len(seen) != len(wanted):
                missing = [n.name for n in inputs if n not in seen]
                raise CalibrationError(f"unit inputs {missing} were never computed")
            per_batch.append([seen[n] for n in inputs])
            count += _batch_size(args)
            if max_samples is not None and count >= max_samples:
                break
    return per_batch


def capture_unit_inputs(
    gm: fx.GraphModule,
    inputs: Sequence[fx.Node],
    batches: Sequence[Batch],
    max_samples: int | None,
    cursor: tuple[ForwardCursor, fx.Node] | None = None,
) -> CapturedInputs:
    """Run ``gm`` on the batches until ``inputs`` are computed, collecting their values.

    A tensor input whose first dimension is the batch's is per sample (concatenated, at most
    ``max_samples``); any other value must be the same in every batch. ``gm`` runs as it is
    (put its quantizers in float mode first for FP inputs). With ``cursor=(cursor, first)``
    the values come from a :class:`ForwardCursor` paused before the unit's ``first`` node
    (the same values, without running the forward from the start).
    """
    per_batch = cursor[0].values_before(cursor[1], inputs) if cursor is not None else None
    if per_batch is None:
        per_batch = partial_forwards(gm, inputs, batches, max_samples)
    collected = [list(slot) for slot in zip(*per_batch)]
    values, batched = [], []
    for n, slot in zip(inputs, collected):
        per_sample = all(
            isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == _batch_size(b[0])
            for v, b in zip(slot, batches)
        )
        if per_sample:
            values.append(torch.cat([v.detach() for v in slot])[:max_samples])
        else:
            first = slot[0]
            if any(not _same(first, v) for v in slot[1:]):
                raise CalibrationError(
                    f"unit input {n.name!r} is neither per-sample nor the same in every batch"
                )
            values.append(first)
        batched.append(per_sample)
    if not any(batched):
        raise CalibrationError("a reconstruction unit has no per-sample input")
    return CapturedInputs(values, batched)


def _batch_size(args: tuple) -> int:
    first = args[0] if args else None
    return first.shape[0] if isinstance(first, torch.Tensor) and first.dim() > 0 else 1


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


def bind_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """Positional values for every placeholder of ``gm`` (defaults for the ones not passed)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = []
    for i, p in enumerate(placeholders):
        if i < len(args):
            values.append(args[i])
        elif p.target in kwargs:
            values.append(kwargs[p.target])
        elif p.args:
            values.append(p.args[0])
        else:
            raise CalibrationError(f"calibration batch lacks input {p.target!r}")
    return values
