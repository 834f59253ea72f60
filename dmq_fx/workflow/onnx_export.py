"""``dmq_fx.export_onnx``: a converted graph as a QDQ ONNX model.

The graph is first rewritten to its export form (:mod:`dmq_fx.lowering.export_form`: every
quantized layer as quantize / dequantize nodes around a float conv or linear), then exported by
``torch.onnx.export(dynamo=True)`` with a translation of dmq_fx's quantize steps that keeps their
exact ranges:

- ``quantize_per_tensor`` / ``_per_channel`` with a range narrower than uint8's (6-bit
  activations, say) become ``QuantizeLinear`` followed by a ``Clip`` of the integers to the
  range (``QuantizeLinear`` alone saturates at uint8's 0..255);
- the per-timestep table choice (``dmq_fx::select_timestep_entry``) becomes ``ArgMin`` over the
  distances to the calibrated timesteps and a ``Gather``;
- weights of at most 4 bits are stored as ONNX ``UINT4`` / ``INT4`` (opset 21 and above), two to
  a byte, their zero points of the same type; wider ones as ``UINT8`` / ``INT8``.

The model takes the graph's tensor inputs (nested ones flattened, as ``torch.onnx`` does) with a
dynamic batch dimension, and returns its output tensors.
"""

from __future__ import annotations

import inspect
import numbers
from pathlib import Path
from typing import Any

import torch
from torch import fx

from dmq_fx.errors import ConfigError, ConvertError
from dmq_fx.lowering.export_form import export_form
from dmq_fx.lowering.quantized_modules import SELECT_TIMESTEP_ENTRY_OP
from dmq_fx.quantize.bitpacking import pack_nibbles

__all__ = ["export_onnx"]

#: the oldest opset torch.onnx's op translations (and dmq_fx's) are written for
MIN_OPSET = 18
#: the oldest opset with 4-bit integer types and per-axis QuantizeLinear / DequantizeLinear
MIN_OPSET_FOR_INT4 = 21
#: how the integer weights are stored (see export_onnx)
WEIGHT_FORMATS = ("packed", "int8")


def export_onnx(
    quantized: fx.GraphModule,
    path: str | Path,
    example_args: tuple,
    example_kwargs: dict[str, Any] | None = None,
    *,
    opset: int = 21,
    dynamic_batch: bool = True,
    weights: str = "packed",
) -> Path:
    """Write ``quantized`` (a :func:`dmq_fx.convert_fx` result, not modified) to ``path`` as a
    QDQ ONNX model, traced with ``example_args`` / ``example_kwargs`` (as the graph is called).

    ``opset``: 21 or later stores weights of at most 4 bits as ``UINT4`` / ``INT4``; 18 to 20
    store them in 8-bit types (values unchanged). ``dynamic_batch``: the first dimension of
    every input whose first dimension is the batch size of the first input is dynamic (the
    example needs a batch of at least 2: ``torch.export`` specialises a size of 1).
    ``weights``: ``"packed"`` stores the integer weights with their zero points, 4-bit ones as
    ``UINT4`` (opset 21 and later; 8-bit types before); ``"int8"`` stores them as the int8
    kernels multiply them, ``W_int - z`` with zero point 0 (the same values; OpenVINO runs such
    layers on int8 kernels, and decompresses 4-bit weights to float instead).
    A Python number among the inputs (the timestep) is exported as a 0-d tensor input.
    Returns the path written.
    """
    import onnx  # optional dependencies: the "onnx" extra

    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"export_onnx: weights={weights!r}; expected one of {WEIGHT_FORMATS}")
    if opset < MIN_OPSET:
        raise ConfigError(
            f"export_onnx: opset {opset}; torch.onnx's translations need opset {MIN_OPSET} or later"
        )
    args = tuple(_as_tensor(a) for a in example_args)
    kwargs = {k: _as_tensor(v) for k, v in (example_kwargs or {}).items()}
    graph = export_form(quantized, centered_weights=weights == "int8")
    dynamic_shapes = _batch_dynamic_shapes(graph, args, kwargs) if dynamic_batch else None
    path = Path(path)
    with torch.no_grad():
        program = torch.onnx.export(
            graph,
            args,
            kwargs=kwargs,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=_translation_table(),
            optimize=True,
            verbose=False,
        )
    model = program.model_proto
    if weights == "packed" and opset >= MIN_OPSET_FOR_INT4:
        _store_4bit_weights(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _as_tensor(value: Any) -> Any:
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return torch.tensor(value)
    return value


def _batch_dynamic_shapes(graph: fx.GraphModule, args: tuple, kwargs: dict) -> dict:
    """``dynamic_shapes`` for torch.export: dim 0 of every tensor sized like the batch."""
    bound = inspect.signature(graph.forward).bind(*args, **kwargs)
    first = next(
        (v for v in bound.arguments.values() if isinstance(v, torch.Tensor) and v.dim()), None
    )
    if first is None:
        raise ConfigError("export_onnx: no tensor input with a batch dimension among the examples")
    batch = first.shape[0]
    if batch < 2:
        raise ConfigError(
            "export_onnx(dynamic_batch=True) needs example inputs with a batch of at least 2 "
            "(torch.export specialises a size of 1); got a batch of 1"
        )
    dim = torch.export.Dim("batch")

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {0: dim} if value.dim() and value.shape[0] == batch else None
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(spec(v) for v in value)
        return None

    return {name: spec(value) for name, value in bound.arguments.items()}


# -- translations (onnxscript, traced when the exporter meets the op) ------------------------------
def _translation_table() -> dict:
    qd = torch.ops.quantized_decomposed
    return {
        qd.quantize_per_tensor.default: _quantize_per_tensor,
        qd.quantize_per_tensor.tensor: _quantize_per_tensor,
        qd.quantize_per_channel.default: _quantize_per_channel,
        qd.dequantize_per_tensor.default: _dequantize_per_tensor,
        qd.dequantize_per_tensor.tensor: _dequantize_per_tensor,
        SELECT_TIMESTEP_ENTRY_OP: _select_entry,
    }


def _quantize_per_tensor(x, scale, zero_point, quant_min, quant_max, dtype):
    from onnxscript import ir
    from onnxscript import opset18 as op

    _check_uint8(dtype)
    zero = op.Cast(_value(op, zero_point), to=ir.DataType.UINT8)
    return _clamp(op, op.QuantizeLinear(x, _float(op, scale, x), zero), quant_min, quant_max)


def _quantize_per_channel(x, scales, zero_points, axis, quant_min, quant_max, dtype):
    from onnxscript import ir
    from onnxscript import opset18 as op

    _check_uint8(dtype)
    zeros = op.Cast(zero_points, to=ir.DataType.UINT8)
    quantized = op.QuantizeLinear(x, op.CastLike(scales, x), zeros, axis=axis)
    return _clamp(op, quantized, quant_min, quant_max)


def _clamp(op, quantized, quant_min: int, quant_max: int):
    """The integers clamped to a range narrower than uint8's (``Clip`` on uint8, between the
    quantize and the dequantize). Clamping the float input before ``QuantizeLinear`` instead
    gives the same integers, but OpenVINO 2026.4 folded such a clamp into its FakeQuantize
    wrongly (fashion28 W4A6: 18 dB against the reference form, below the quantization error;
    34.5 dB with the integer clamp, on the same number of int8 kernels)."""
    from onnxscript import ir

    if (quant_min, quant_max) == (0, 255):
        return quantized
    lo = op.Cast(_value(op, quant_min), to=ir.DataType.UINT8)
    hi = op.Cast(_value(op, quant_max), to=ir.DataType.UINT8)
    return op.Clip(quantized, lo, hi)


def _dequantize_per_tensor(q, scale, zero_point, quant_min, quant_max, dtype, out_dtype=None):
    from onnxscript import ir
    from onnxscript import opset18 as op

    _check_uint8(dtype)
    scale = op.Cast(_value(op, scale), to=ir.DataType.FLOAT)
    zero = op.Cast(_value(op, zero_point), to=ir.DataType.UINT8)
    return op.DequantizeLinear(q, scale, zero)


def _select_entry(timestep, grid, table):
    from onnxscript import ir
    from onnxscript import opset18 as op

    # the first sample's timestep (a lowered call shares one); the nearest calibrated one, ties
    # to the lower (the grid is sorted); outside the grid, the nearest end (no error in ONNX)
    t = op.Cast(op.Reshape(timestep, op.Constant(value_ints=[-1])), to=ir.DataType.DOUBLE)
    first = op.Slice(t, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
    distance = op.Abs(op.Sub(op.Cast(grid, to=ir.DataType.DOUBLE), first))
    index = op.ArgMin(distance, axis=0, keepdims=0)
    return op.Gather(table, index, axis=0)


def _value(op, number: Any):
    if isinstance(number, float):
        return op.Constant(value_float=number)
    if isinstance(number, int):
        return op.Constant(value_int=number)
    return number  # already a tensor (the .tensor overloads)


def _float(op, value: Any, like):
    return op.CastLike(
        _value(op, float(value)) if isinstance(value, numbers.Number) else value, like
    )


def _check_uint8(dtype: Any) -> None:
    if dtype is not torch.uint8 and dtype != 2:  # torch.uint8 or ONNX's UINT8 enum value
        raise ConvertError(f"export_onnx: activations quantize to uint8, got dtype {dtype}")


# -- 4-bit weights ---------------------------------------------------------------------------------
def _store_4bit_weights(model) -> None:
    """Store the integer weights (and zero points) of DequantizeLinear nodes whose values fit in
    4 bits as UINT4 / INT4 initializers, two values to a byte."""
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    four_bit = {
        TensorProto.UINT8: (TensorProto.UINT4, 0, 15),
        TensorProto.INT8: (TensorProto.INT4, -8, 7),
    }
    candidates = {}
    nodes = list(model.graph.node)
    for i, node in enumerate(nodes):
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        weight, zero = inits.get(node.input[0]), inits.get(node.input[2])
        if weight is None or zero is None or weight.data_type != zero.data_type:
            continue
        if weight.data_type not in four_bit:
            continue
        _, lo, hi = four_bit[weight.data_type]
        values = [numpy_helper.to_array(t) for t in (weight, zero)]
        if all(not v.size or lo <= v.min() <= v.max() <= hi for v in values):
            candidates[i] = (weight, zero)
    # a tensor is retyped only if every node reading it can take the 4-bit type (protobuf hands
    # out a new wrapper per access: nodes are told apart by position)
    while True:
        shared = {
            name for i, node in enumerate(nodes) if i not in candidates for name in node.input
        }
        dropped = [k for k, (w, z) in candidates.items() if {w.name, z.name} & shared]
        if not dropped:
            break
        for k in dropped:
            del candidates[k]
    retyped = set()
    for weight, zero in candidates.values():
        for tensor in (weight, zero):
            if tensor.name in retyped:
                continue
            retyped.add(tensor.name)
            target = four_bit[tensor.data_type][0]
            v = numpy_helper.to_array(tensor)
            # ONNX's 4-bit layout is the one of pack_nibbles: element 2i in the low nibble,
            # INT4 as two's complement
            nibbles = torch.from_numpy((v.astype(np.int16) & 0xF).astype(np.uint8))
            packed = pack_nibbles(nibbles).numpy().tobytes()
            tensor.CopyFrom(onnx.helper.make_tensor(tensor.name, target, v.shape, packed, raw=True))
