"""``summary``: a table of the quantized layers of a prepared, calibrated or converted graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from dmq_fx.graph.meta import ANNOTATION_KEY, LayerQuantSpec, graph_state, quantized_layer_nodes
from dmq_fx.lowering.quantized_modules import QuantizedLayer
from dmq_fx.passes import input_quantizer_name, les_scale_name, weight_quantizer

__all__ = ["QuantSummary", "summary"]

COLUMNS = (
    "node",
    "module",
    "weight",
    "act",
    "act_scale",
    "act_zp",
    "weight_scale",
    "les_tau",
    "form",
    "dmq",
)


@dataclass
class QuantSummary:
    """Rows (one dict per quantized layer, keys :data:`COLUMNS`) and a header; prints as a table."""

    header: dict[str, Any]
    rows: list[dict[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        head = ", ".join(f"{k}: {v}" for k, v in self.header.items())
        table = [COLUMNS] + [tuple(r[c] for c in COLUMNS) for r in self.rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return head + "\n" + "\n".join(lines)


def _fmt_range(values: list[float]) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:.3g}" if lo == hi else f"{lo:.3g}..{hi:.3g}"


def _weight_desc(spec: LayerQuantSpec) -> str:
    scheme = {
        torch.per_channel_affine: "per-channel affine",
        torch.per_channel_symmetric: "per-channel symmetric",
        torch.per_tensor_affine: "per-tensor affine",
        torch.per_tensor_symmetric: "per-tensor symmetric",
    }[spec.weight_qscheme]
    return f"{spec.weight_bits}b {scheme}"


def summary(gm: fx.GraphModule, print_table: bool = False) -> QuantSummary:
    """Summarise the quantized layers of a graph from prepare_fx, calibrate or convert_fx.

    Columns: ``node`` (graph node name, following the module name), ``module`` (float type),
    ``weight`` (bits and granularity), ``act`` (activation bits, ``xN`` when the input is split
    into N groups), ``act_scale`` / ``act_zp`` (activation step and zero point; a range over
    groups), ``weight_scale`` (range of per-channel steps), ``les_tau`` (range of the layer's
    LES vector, ``-`` without LES), ``form`` (``observing``, ``fake-quant``, ``reference`` or
    ``int8``) and ``dmq`` (DMQ rewrites: ``split``; ``les`` before conversion, then ``les:norm``
    (1/tau folded into the norm before the layer) or ``les:step`` (merged into a per-channel
    quantize step tau * s); ``pts``, then ``pts:shift`` (integer shifts) or ``pts:dequant``;
    ``adaround``; ``t-table`` (per-timestep activation qparams: act_scale / act_zp then range
    over the timesteps)).
    """
    meta = graph_state(gm)
    state = (meta.state if meta is not None else None) or "traced"
    rows = []
    for node in quantized_layer_nodes(gm):
        spec: LayerQuantSpec = node.meta[ANNOTATION_KEY]
        mod = gm.get_submodule(node.target)
        n = len(spec.input_groups)
        if isinstance(mod, QuantizedLayer):
            act = [(s, z) for s, z, _, _ in getattr(mod, "act_table", mod.act_qparams)]
            w_scales = [float(v) for g in range(n) for v in getattr(mod, f"weight_scale_{g}")]
            form = mod.form
            tau = list(spec.les_tau or ())
        else:
            fqs = [gm.get_submodule(input_quantizer_name(node.target, g, n)) for g in range(n)]
            calibrated = state == "calibrated"
            entries = [e for fq in fqs for e in getattr(fq, "entries", [fq])]
            act = [(float(e.scale), int(e.zero_point)) for e in entries] if calibrated else []
            w_scales = (
                [float(v) for fq in weight_quantizer(mod).fake_quants for v in fq.scale.reshape(-1)]
                if calibrated
                else []
            )
            form = "fake-quant" if calibrated else "observing"
            tau = (
                gm.get_submodule(les_scale_name(spec.les_owner)).tau.detach().tolist()
                if spec.les_owner
                else []
            )
        rows.append(
            {
                "node": node.name,
                "module": spec.module_type,
                "weight": _weight_desc(spec),
                "act": f"{spec.act_bits}b" + (f" x{n}" if n > 1 else ""),
                "act_scale": _fmt_range([s for s, _ in act]),
                "act_zp": _fmt_range([z for _, z in act]),
                "weight_scale": _fmt_range(w_scales),
                "les_tau": _fmt_range(tau),
                "form": form,
                "dmq": ",".join(spec.rewrites) or "-",
            }
        )
    layers = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module"
        and isinstance(gm.get_submodule(n.target), (torch.nn.Conv2d, torch.nn.Linear))
    ]
    header = {"state": state, "quantized layers": len(rows), "float conv/linear": len(layers)}
    if meta is not None and meta.backend is not None:
        header["backend"] = meta.backend
    if meta is not None and meta.stages_run:
        header["stages"] = " > ".join(meta.stages_run)
    result = QuantSummary(header, rows)
    if print_table:
        print(result)
    return result
