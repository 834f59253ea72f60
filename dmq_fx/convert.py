"""``convert_fx``: lower a calibrated graph to a static quantized graph."""

from __future__ import annotations

import copy

import torch
from torch import fx

from .annotate import LayerQuantSpec, quantized_layer_nodes
from .errors import ConvertError
from .passes import input_quantizer_name
from .quantized_modules import (
    INT16_MAX,
    QuantizedLayer,
    cpu_has_int8_dot_product,
    int16_pair_bound,
    quantize_uint8,
)

__all__ = ["BACKENDS", "convert_fx"]

BACKENDS = ("reference", "x86", "onednn")
_qd = torch.ops.quantized_decomposed


def _integer_weights(layer: torch.nn.Module, spec: LayerQuantSpec):
    """Per input group: (integer weight, per-channel scale, per-channel zero point), qmin, qmax."""
    grouped = layer.parametrizations.weight[0]
    weight = layer.parametrizations.weight.original.detach()
    out = []
    for fq, part in zip(grouped.fake_quants, torch.split(weight, spec.input_groups, dim=1)):
        scale = fq.scale.detach().float().reshape(-1).expand(part.shape[0]).contiguous()
        zp = fq.zero_point.detach().int().reshape(-1).expand(part.shape[0]).contiguous()
        dtype = torch.uint8 if fq.quant_min >= 0 else torch.int8
        w_int = _qd.quantize_per_channel(
            part.float(), scale, zp, 0, fq.quant_min, fq.quant_max, dtype
        )
        out.append((w_int, scale, zp))
    fq0 = grouped.fake_quants[0]
    return out, fq0.quant_min, fq0.quant_max


def _choose_form(backend: str, weights, act_qparams, qmin: int, qmax: int) -> str:
    if backend == "reference":
        return "reference"
    for _, _, zp in weights:
        if (qmin - zp).min() < -128 or (qmax - zp).max() > 127:
            # An affine 8-bit weight minus its zero point does not fit int8.
            return "reference"
    if not cpu_has_int8_dot_product():
        for (w_int, _, zp), (_, _, _, act_qmax) in zip(weights, act_qparams):
            w8 = w_int.int() - zp.view(-1, *([1] * (w_int.dim() - 1)))
            if int16_pair_bound(w8, act_qmax) > INT16_MAX:
                return "reference"
    return "int8"


def convert_fx(prepared: fx.GraphModule, backend: str = "x86") -> fx.GraphModule:
    """Lower a calibrated graph (from :func:`dmq_fx.calibrate`) to a static quantized graph.

    ``backend="reference"``: ``quantized_decomposed`` quantize / dequantize ops with the exact
    ``quant_min`` / ``quant_max`` of each quantizer around float conv / linear on dequantized
    integer weights. ``backend="x86"`` (or ``"onednn"``, the same kernels): uint8 activations and
    int8 weights on onednn's integer kernels with float32 outputs. On CPUs without VNNI / AMX a
    layer whose int16 pair sums could saturate is lowered in the reference form instead (exact,
    not faster); :func:`dmq_fx.summary` shows each layer's form. ``prepared`` is not modified.
    """
    if backend not in BACKENDS:
        raise ConvertError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend != "reference" and not torch.backends.mkldnn.is_available():
        raise ConvertError(f"backend {backend!r} needs a torch build with oneDNN (mkldnn)")
    state = (
        prepared.meta.get("dmq_fx", {}).get("state")
        if isinstance(prepared, fx.GraphModule)
        else None
    )
    if state != "calibrated":
        raise ConvertError(
            "convert_fx() needs a calibrated graph: run dmq_fx.calibrate(prepared, data) first"
            if state == "prepared"
            else f"convert_fx() expects the graph from dmq_fx.prepare_fx + calibrate, got "
            f"{'a ' + state + ' graph' if state else type(prepared).__name__}"
        )
    gm = copy.deepcopy(prepared)
    gm.meta = copy.deepcopy(prepared.meta)
    graph = gm.graph
    for node in quantized_layer_nodes(gm):
        spec: LayerQuantSpec = node.meta["dmq_fx"]
        layer = gm.get_submodule(node.target)
        n_groups = len(spec.input_groups)
        quant_nodes = [node.args[0]] if n_groups == 1 else list(node.args[0].args[0])
        cat = node.args[0] if n_groups > 1 else None
        act_qparams = []
        for g in range(n_groups):
            fq = gm.get_submodule(input_quantizer_name(node.target, g, n_groups))
            act_qparams.append(
                (float(fq.scale), int(fq.zero_point), int(fq.quant_min), int(fq.quant_max))
            )
        weights, qmin, qmax = _integer_weights(layer, spec)
        form = _choose_form(backend, weights, act_qparams, qmin, qmax)
        new_inputs = []
        with graph.inserting_before(node):
            for g, (qnode, (s, z, amin, amax)) in enumerate(zip(quant_nodes, act_qparams)):
                x = qnode.args[0]
                suffix = f"_{g}" if n_groups > 1 else ""
                if form == "int8":
                    q = graph.create_node(
                        "call_function",
                        quantize_uint8,
                        (x, s, z, amin, amax),
                        name=f"{node.name}_input_q{suffix}",
                    )
                    new_inputs.append(q)
                else:
                    args = (s, z, amin, amax, torch.uint8)
                    q = graph.create_node(
                        "call_function",
                        _qd.quantize_per_tensor.default,
                        (x, *args),
                        name=f"{node.name}_input_q{suffix}",
                    )
                    new_inputs.append(
                        graph.create_node(
                            "call_function",
                            _qd.dequantize_per_tensor.default,
                            (q, *args),
                            name=f"{node.name}_input_dq{suffix}",
                        )
                    )
        node.args = tuple(new_inputs)
        for dead in ([cat] if cat is not None else []) + quant_nodes:
            if not dead.users:
                graph.erase_node(dead)
        for g in range(n_groups):
            gm.delete_submodule(input_quantizer_name(node.target, g, n_groups))
        gm.add_submodule(
            node.target,
            QuantizedLayer(
                layer,
                [w for w, _, _ in weights],
                [s for _, s, _ in weights],
                [z for _, _, z in weights],
                qmin,
                qmax,
                act_qparams,
                form,
                spec.module_type,
            ),
        )
    graph.lint()
    gm.recompile()
    gm.meta["dmq_fx"]["state"] = "converted"
    gm.meta["dmq_fx"]["backend"] = backend
    return gm
