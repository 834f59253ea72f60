"""``dmq_fx.compile``: a converted graph through ``torch.compile`` with what it needs.

A converted graph compiles with ``fullgraph=True`` (no graph break: the per-timestep table
choice is a custom op with a fake kernel, the output class is looked up, not imported). Its int8
layers call onednn's ``qconv_pointwise`` / ``qlinear_pointwise`` on weights packed once, which
inductor accepts only as constants: ``freezing`` turns the graph's buffers into constants and
folds the packing. Inductor then fuses the float work around the integer kernels (norms,
activations, the quantize step, the LES and PTS scaling) into few kernels. Reference-form layers
stay exact float layers (their weights are dequantized with plain arithmetic, which inductor's
x86 passes do not turn into int8 kernels).

Numbers: inductor computes the float parts in another order (fused reductions, vectorised
``exp``), so an activation that lands within float rounding of a rounding boundary can get the
neighbouring integer; compiled and eager graphs agree to float rounding otherwise (tested:
compiled vs eager SQNR at least 15 dB above the quantization error on random-weight tiny UNets,
where one flipped integer weighs most).
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import fx

from dmq_fx.errors import ConvertError, TimestepOutOfGridError
from dmq_fx.graph import graph_ops
from dmq_fx.graph.meta import graph_state
from dmq_fx.lowering.quantized_modules import QuantizedLayer
from dmq_fx.observers import nearest_grid_index

__all__ = ["CompiledQuantizedGraph", "DEFAULT_INDUCTOR_OPTIONS", "compile"]

#: inductor settings ``dmq_fx.compile`` adds: the compiled graph's host code in C++ instead of
#: Python. A lowered UNet launches a few hundred kernels per call, and the Python wrapper's
#: per-kernel cost weighs at small batches and on small models (``python
#: benchmarks/compile_options.py``); it costs a longer first compile (a C++ build).
DEFAULT_INDUCTOR_OPTIONS: dict[str, Any] = {"cpp_wrapper": True}


class CompiledQuantizedGraph(torch.nn.Module):
    """A converted graph and its ``torch.compile`` version. Calls run the compiled one under
    ``torch.no_grad()`` (inductor freezes weights only for inference) with inductor's
    ``freezing`` on: compilation happens lazily at a call, and ``torch.compile``'s ``options``
    do not reach the freezing pass, so the setting is patched around each call instead of
    changing it for the whole process."""

    def __init__(self, quantized: fx.GraphModule, compiled: Any) -> None:
        super().__init__()
        self.quantized = quantized
        self._compiled = compiled
        # per-timestep tables: the grids their entries were calibrated at (buffers "*_grid")
        self._grids = [b for name, b in quantized.named_buffers() if name.endswith("_grid")]
        names = graph_state(quantized).input_names
        self._timestep_index = names.index("timestep") if "timestep" in names else None
        # the checks of nested inputs (keys, lengths, constants), run before the compiled graph
        checks = (graph_ops.check_structure, graph_ops.check_constant)
        self._input_checks = [
            n for n in quantized.graph.nodes if n.op == "call_function" and n.target in checks
        ]

    def _check_timestep(self, args: tuple, kwargs: dict) -> None:
        """Refuse a timestep the tables were not calibrated for, before the compiled graph runs:
        an exception raised inside compiled code reaches the caller as a dynamo error."""
        if "timestep" in kwargs:
            timestep = kwargs["timestep"]
        elif self._timestep_index is not None and len(args) > self._timestep_index:
            timestep = args[self._timestep_index]
        else:
            return
        t = torch.as_tensor(timestep).reshape(-1)
        if t.numel() > 1 and not bool((t == t[0]).all()):
            raise TimestepOutOfGridError(
                "a lowered graph with per-timestep activation tables quantizes a batch with "
                f"one table entry: call it with one timestep per batch, got {t.unique().tolist()}"
            )
        for grid in self._grids:
            nearest_grid_index(grid, t[:1])  # raises outside the calibrated range

    def _check_nested_inputs(self, args: tuple, kwargs: dict) -> None:
        """Run the graph's checks of dict / tuple inputs eagerly, so a wrong input raises the
        graph's own InputMismatchError instead of a dynamo error from inside compiled code."""
        bound = inspect.signature(self.quantized.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        values = {
            n: bound.arguments[n.target]
            for n in self.quantized.graph.nodes
            if n.op == "placeholder" and n.target in bound.arguments
        }

        def value(node: fx.Node) -> Any:
            if node not in values:  # an entry of a checked container (getitem of getitem ...)
                if node.op != "call_function" or node.target is not operator.getitem:
                    raise TypeError(f"input check reads node '{node.name}', not an input entry")
                values[node] = value(node.args[0])[node.args[1]]
            return values[node]

        for check in self._input_checks:  # in graph order: a container before its entries
            check.target(*fx.node.map_arg(check.args, value))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._grids:
            self._check_timestep(args, kwargs)
        if self._input_checks:
            self._check_nested_inputs(args, kwargs)
        previous = inductor_config.freezing
        inductor_config.freezing = True
        try:
            with torch.no_grad():
                return self._compiled(*args, **kwargs)
        finally:
            inductor_config.freezing = previous


def compile(  # noqa: A001  (dmq_fx.compile, as torch.compile)
    quantized: fx.GraphModule,
    *,
    dynamic: bool | None = None,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> CompiledQuantizedGraph:
    """``torch.compile(quantized, fullgraph=True)`` with inductor's ``freezing`` on.

    ``quantized`` is a :func:`dmq_fx.convert_fx` result (not modified). ``dynamic``: None
    compiles for the first batch size and recompiles once with a dynamic batch dimension when
    another one arrives (torch.compile's default); True compiles dynamic at once (batch 1 still
    gets its own graph: torch.compile specialises sizes 0 and 1); False compiles once per batch
    size. ``mode`` and ``options`` (inductor settings) go to ``torch.compile``; ``options``
    defaults to :data:`DEFAULT_INDUCTOR_OPTIONS` (the C++ wrapper), and a key given there
    replaces the default (``options={"cpp_wrapper": False}`` keeps inductor's Python wrapper).
    Compilation happens at the first call of each shape (a minute or more for a UNet on a small
    CPU); pass the timestep as a tensor, or every new Python number
    is a new constant to compile for.
    """
    record = graph_state(quantized)
    if record is None or record.state != "converted":
        state = record.state if record is not None else type(quantized).__name__
        raise ConvertError(
            f"dmq_fx.compile() takes the graph returned by dmq_fx.convert_fx, got {state!r}"
        )
    for module in quantized.modules():
        if isinstance(module, QuantizedLayer) and module.form == "int8":
            module.pack()  # onednn's prepack has no fake kernel: pack before tracing
    compiled = torch.compile(
        quantized,
        fullgraph=True,
        dynamic=dynamic,
        mode=mode,
        options={**DEFAULT_INDUCTOR_OPTIONS, **(options or {})},
    )
    return CompiledQuantizedGraph(quantized, compiled)
