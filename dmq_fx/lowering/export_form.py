"""The export form of a converted graph: every quantized layer as quantize / dequantize / float op.

``convert_fx`` lowers a layer either to onednn int8 kernels (``form="int8"``: the input is
quantized to uint8 by :func:`quantize_uint8`, the weights are packed for onednn) or to the
reference form (``quantized_decomposed`` quantize / dequantize nodes before a
:class:`QuantizedLayer` whose weight is dequantized with plain arithmetic). Neither is what an
exporter can hand to another engine: onednn calls have no ONNX counterpart, and the arithmetic
on the integer weights is folded into a float constant by ONNX optimizers. :func:`export_form`
rewrites a copy of the graph so that every quantized layer reads

    x ── [x * (s / step_c)] ── quantize_per_tensor(s, z) ── dequantize_per_tensor(s, z) ──┐
    W_int ── dequantize_per_channel(axis 0; a linear's W_int^T: axis 1) ── conv2d / matmul (+ b)

the pattern engines (onnxruntime, OpenVINO, TensorRT) recognise as a quantized layer. It matches
``call_module`` nodes of :class:`QuantizedLayer` and, for the int8 form, the
``quantize_uint8`` / ``quantize_uint8_per_channel`` nodes feeding them, and then every
``quantize_per_channel`` with constant steps read by a per-tensor dequantize (LES merged into
the step, PTS shifts). The integers are those of the converted graph up to float rounding: a
per-channel step becomes a multiply by ``s / step_c`` before a per-tensor quantize, which can
move a value lying within float rounding of a .5 tie by one integer. Attention that
``convert_fx`` chunked (``chunked_attention``) is written back as
``scaled_dot_product_attention``. With
``centered_weights=True`` the weights are ``W_int - z`` in int8 with zero point 0.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx

from dmq_fx.errors import ConvertError
from dmq_fx.graph.meta import graph_state
from dmq_fx.lowering.attention import chunked_attention
from dmq_fx.lowering.convert import add_constant
from dmq_fx.lowering.quantized_modules import (
    QuantizedLayer,
    quantize_uint8,
    quantize_uint8_per_channel,
)

__all__ = ["export_form"]

_qd = torch.ops.quantized_decomposed


def export_form(quantized: fx.GraphModule, centered_weights: bool = False) -> fx.GraphModule:
    """A copy of ``quantized`` (a :func:`dmq_fx.convert_fx` result, not modified) with every
    :class:`QuantizedLayer` written out as quantize / dequantize / float conv or linear nodes.

    ``centered_weights``: the weights as the int8 kernels multiply them, ``W_int - z`` in int8
    with zero point 0 (the same values; what engines with symmetric int8 weight kernels, such
    as OpenVINO's, need), instead of the stored ``W_int`` with its zero points (4-bit weights
    stay in the 4-bit range 0..15)."""
    record = graph_state(quantized)
    if record is None or record.state != "converted":
        state = record.state if record is not None else type(quantized).__name__
        raise ConvertError(f"expected the graph returned by dmq_fx.convert_fx, got {state!r}")
    gm = copy.deepcopy(quantized)
    gm.meta = copy.deepcopy(quantized.meta)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), QuantizedLayer):
            _write_out(gm, node, centered_weights)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is _qd.quantize_per_channel.default:
            _per_tensor_quantize(gm, node)
        elif node.op == "call_function" and node.target is chunked_attention:
            node.target = F.scaled_dot_product_attention  # the same attention, which ONNX has
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def _write_out(gm: fx.GraphModule, node: fx.Node, centered_weights: bool) -> None:
    layer: QuantizedLayer = gm.get_submodule(node.target)
    graph = gm.graph
    with graph.inserting_before(node):
        inputs = list(node.args)
        if layer.form == "int8":
            inputs = [_reference_input(gm, layer, x, g) for g, x in enumerate(inputs)]
        out = None
        for g, x in enumerate(inputs):
            y = _layer_op(gm, node, layer, g, x, centered_weights)
            out = y if out is None else graph.call_function(torch.add, (out, y))
    out.meta = dict(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _layer_op(
    gm: fx.GraphModule,
    node: fx.Node,
    layer: QuantizedLayer,
    g: int,
    x: fx.Node,
    centered_weights: bool,
) -> fx.Node:
    """Input group ``g``'s float op on its dequantized integer weight. A linear layer reads its
    weight transposed, ``x @ dequantize(W_int^T, axis 1) + b``, so that the dequantize feeds the
    matmul directly (``F.linear`` exports as a transpose between them, which hides the pattern)."""
    graph = gm.graph
    prefix = f"{node.target}.weight"
    if centered_weights:
        w_int = layer.integer_weight(g)
        zero_point = add_constant(
            gm, f"{prefix}_export_zero_point_{g}", torch.zeros(w_int.shape[0], dtype=torch.int32)
        )
        qmin, qmax = -128, 127
    else:
        w_int = getattr(layer, f"weight_int_{g}")
        zero_point = graph.get_attr(f"{prefix}_zero_point_{g}")
        qmin, qmax = layer.weight_quant_min, layer.weight_quant_max
    scale = graph.get_attr(f"{prefix}_scale_{g}")
    bias = graph.get_attr(f"{node.target}.bias") if g == 0 and layer.bias is not None else None
    stored, axis = (w_int, 0) if layer.is_conv else (w_int.t().contiguous(), 1)
    weight = graph.call_function(
        _qd.dequantize_per_channel.default,
        (
            add_constant(gm, f"{prefix}_export_int_{g}", stored.clone()),
            scale,
            zero_point,
            axis,
            qmin,
            qmax,
            w_int.dtype,
        ),
    )
    if layer.is_conv:
        conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)
        return graph.call_function(F.conv2d, (x, weight, bias, *conv_args))
    y = graph.call_function(torch.matmul, (x, weight))
    return y if bias is None else graph.call_function(torch.add, (y, bias))


def _reference_input(gm: fx.GraphModule, layer: QuantizedLayer, q: fx.Node, g: int) -> fx.Node:
    """The quantize / dequantize pair standing for an int8 layer's uint8 input ``q``."""
    graph = gm.graph
    s, z, amin, amax = layer.act_qparams[g][:4]
    if q.op == "call_function" and q.target is quantize_uint8:
        x, qs, qz, qmin, qmax = q.args
        quantized = graph.call_function(
            _qd.quantize_per_tensor.default, (x, qs, qz, qmin, qmax, torch.uint8)
        )
    elif q.op == "call_function" and q.target is quantize_uint8_per_channel:
        # x * inv_steps quantized at the step s the kernel dequantizes with: x * (s * inv_steps)
        # quantized at s, a per-tensor pair (see _per_tensor_quantize)
        x, inv_steps, qz, axis, qmin, qmax = q.args
        factor = float(s) * _constant(gm, inv_steps).float()
        name = f"{inv_steps.target}_export"
        quantized = _scaled_quantize(gm, x, axis, factor, name, (s, int(qz), qmin, qmax))
    else:
        raise ConvertError(
            f"node '{q.name}' feeds an int8 layer but is not one of convert_fx's quantize "
            "steps; was the graph edited after convert_fx?"
        )
    return graph.call_function(
        _qd.dequantize_per_tensor.default, (quantized, s, z, amin, amax, torch.uint8)
    )


def _per_tensor_quantize(gm: fx.GraphModule, q: fx.Node) -> None:
    """Rewrite ``quantize_per_channel(x, steps, z)`` read by ``dequantize_per_tensor(., s, z)``
    (LES merged into the step, PTS shifts) into ``quantize_per_tensor(x * (s / steps), s, z)``.

    The same integers ``round(x / steps_c)`` up to float rounding, with the quantize and the
    dequantize now a per-tensor pair of equal step: engines fuse that pair into their int8
    kernels (onnxruntime's QDQ fusion and OpenVINO's FakeQuantize take per-tensor activation
    steps only; OpenVINO refuses per-channel ones along a linear layer's last axis). Left as is:
    steps chosen at run time (timestep tables), per-channel zero points, and a per-channel
    dequantize (``pts:dequant``)."""
    x, steps_node, zps_node, axis, qmin, qmax, _ = q.args
    users = list(q.users)
    if len(users) != 1 or users[0].target is not _qd.dequantize_per_tensor.default:
        return
    if steps_node.op != "get_attr" or zps_node.op != "get_attr":
        return
    _, s, z, *_ = users[0].args
    zero_points = _constant(gm, zps_node)
    if not bool((zero_points == int(z)).all()):
        return
    factor = float(s) / _constant(gm, steps_node).float()
    with gm.graph.inserting_before(q):
        name = f"{steps_node.target}_export"
        per_tensor = _scaled_quantize(gm, x, axis, factor, name, (s, int(z), qmin, qmax))
    q.replace_all_uses_with(per_tensor)
    gm.graph.erase_node(q)


def _scaled_quantize(
    gm: fx.GraphModule, x: fx.Node, axis: int, factor: torch.Tensor, name: str, qparams: tuple
) -> fx.Node:
    """``quantize_per_tensor(x * factor, s, z, q_min, q_max)``, ``factor`` one value per channel
    along ``axis`` of ``x`` (a constant ``name`` shaped to broadcast)."""
    rank = len(x.meta["tensor_meta"].shape)
    shape = [1] * rank
    shape[axis % rank] = -1
    factor_node = add_constant(gm, name, factor.reshape(shape).contiguous())
    scaled = gm.graph.call_function(torch.mul, (x, factor_node))
    return gm.graph.call_function(_qd.quantize_per_tensor.default, (scaled, *qparams, torch.uint8))


def _constant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    if node.op != "get_attr":
        raise ConvertError(f"expected a constant (get_attr) at node '{node.name}'")
    return gm.get_buffer(node.target)
