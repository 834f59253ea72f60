"""dmq_fx.export_onnx: QDQ ONNX models that onnxruntime runs like convert_fx's reference form."""

import collections

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import state_snapshot
from onnx import TensorProto, numpy_helper

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.lowering.quantized_modules import QuantizedLayer
from dmq_fx.metrics import sqnr_db

#: the documented bound on the reference models: onnxruntime vs the reference form at least
#: this far above the quantization error (reference form vs float) in SQNR
MARGIN_DB = 6.0
#: on tiny random-weight UNets: QuantizeLinear divides by the step where torch multiplies by
#: its reciprocal, so an activation within float rounding of a .5 tie can get the neighbouring
#: integer, and random weights amplify one such flip downstream (as for x86 vs reference,
#: benchmarks/lowering_agreement.py); a systematic error (a wrong range, step or table entry)
#: costs far more than this margin
TINY_MARGIN_DB = 3.0
DMQ_STRUCTURE = ["smoothquant", "observe_activations", "vote_pts", "observe_weights"]


def _calibrated(model, bits, data, stages=DMQ_STRUCTURE, **flags):
    prepared = dmq_fx.prepare_fx(
        model, dmq_fx.get_default_qconfig_mapping(*bits), *data[0], **flags
    )
    dmq_fx.calibrate(prepared, data, stages, progress=False)
    return prepared


def _run(path, inputs: dict) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.asarray(inputs[i.name]) for i in session.get_inputs()}
    return torch.from_numpy(session.run(None, feeds)[0])


def _feeds(args, kwargs) -> dict:
    return {"sample": args[0], "timestep": torch.as_tensor(args[1]), **kwargs}


def _margin_db(model, reference, path, args, kwargs) -> float:
    with torch.no_grad():
        ref, fp = reference(*args, **kwargs).sample, model(*args, **kwargs).sample
    return sqnr_db(ref, _run(path, _feeds(args, kwargs))) - sqnr_db(fp, ref)


def _qdq_layout(model_proto):
    """(weight DequantizeLinear nodes with the op reading them, activation QuantizeLinear nodes
    with the op reading them, initializer types by name)."""
    inits = {t.name: t for t in model_proto.graph.initializer}
    readers = collections.defaultdict(list)
    for node in model_proto.graph.node:
        for name in node.input:
            readers[name].append(node)
    weights = [
        (n, readers[n.output[0]])
        for n in model_proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    ]
    quantize = [
        (n, readers[n.output[0]]) for n in model_proto.graph.node if n.op_type == "QuantizeLinear"
    ]
    return weights, quantize, inits


def _constant_value(proto, name):
    """The tensor behind ``name``: an initializer or a Constant node's value."""
    for t in proto.graph.initializer:
        if t.name == name:
            return t
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return n.attribute[0].t
    raise KeyError(name)


def test_dmq_structured_w4a6_graph_runs_on_onnxruntime(tmp_path):
    """LES as per-channel steps, PTS as shifts, split concatenations, 6-bit activations and
    4-bit weights, from the x86 form: the QDQ pattern per layer, UINT4 weights, exact clamps,
    a dynamic batch, outputs within the bound of the reference form."""
    model = build_unet(TINY_SD)
    data = [example_inputs(model, batch=4, seed=s) for s in range(2)]
    prepared = _calibrated(model, (4, 6), data, les=True, pts="skip")
    x86 = dmq_fx.convert_fx(prepared, "x86")
    reference = dmq_fx.convert_fx(prepared, "reference")
    rewrites = ",".join(r["dmq"] for r in dmq_fx.summary(x86).rows)
    assert "les:step" in rewrites and "pts:shift" in rewrites and "split" in rewrites
    before = state_snapshot(x86)
    code = x86.code
    path = dmq_fx.export_onnx(x86, tmp_path / "unet.onnx", *example_inputs(model, batch=2))
    assert x86.code == code and all(
        torch.equal(v, before[0][k]) for k, v in x86.state_dict().items()
    )

    proto = onnx.load(str(path))
    weights, quantize, inits = _qdq_layout(proto)
    groups = sum(m.num_groups for m in x86.modules() if isinstance(m, QuantizedLayer))
    assert len(weights) == groups  # one integer weight per layer input group ...
    for dq, readers in weights:  # ... dequantized straight into its conv / matmul
        assert [r.op_type for r in readers] in (["Conv"], ["MatMul"]), dq.input[0]
        w, zero = inits[dq.input[0]], inits[dq.input[2]]
        values = numpy_helper.to_array(w).astype(int)
        if values.min() >= 0:  # 4-bit weights (0..15) as UINT4, zero points alike
            assert w.data_type == zero.data_type == TensorProto.UINT4, dq.input[0]
        else:  # PTS shifts: W_int << j in int8 (INT4 where they fit)
            assert w.data_type in (TensorProto.INT8, TensorProto.INT4), dq.input[0]
    # every activation quantize is clamped to the 6-bit range, then dequantized
    assert quantize
    for q, readers in quantize:
        assert [r.op_type for r in readers] == ["Clip"], q.name
        bounds = [
            int(numpy_helper.to_array(_constant_value(proto, n))) for n in readers[0].input[1:]
        ]
        assert bounds == [0, 63], q.name
    assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim[:1]] == ["batch"]

    for batch in (2, 3):
        args, kwargs = example_inputs(model, batch=batch, seed=20 + batch)
        assert _margin_db(model, reference, path, args, kwargs) >= TINY_MARGIN_DB, batch


def test_weight_formats_change_no_output(tmp_path):
    """UINT4 packing is exact, and so is the int8 format (W_int - z, zero point 0): the model,
    the same model with its UINT4 tensors unpacked to UINT8 by onnx's reader, and the int8 one
    give equal outputs; the 4-bit tensors take half the bytes."""
    model = build_unet(TINY_DDPM)
    data = [example_inputs(model, batch=4, seed=s) for s in range(2)]
    converted = dmq_fx.convert_fx(_calibrated(model, (4, 8), data, dmq_fx.DEFAULT_STAGES), "x86")
    args, kwargs = example_inputs(model, batch=2)
    packed = dmq_fx.export_onnx(converted, tmp_path / "int4.onnx", args, kwargs)
    centered = dmq_fx.export_onnx(converted, tmp_path / "c.onnx", args, kwargs, weights="int8")
    proto = onnx.load(str(packed))
    four = [t for t in proto.graph.initializer if t.data_type == TensorProto.UINT4]
    assert len(four) >= 2 * 10  # the integer weights and their zero points
    for t in four:
        values = numpy_helper.to_array(t).astype(np.uint8)
        assert values.max() <= 15 and len(t.raw_data) == (values.size + 1) // 2, t.name
        t.CopyFrom(numpy_helper.from_array(values, t.name))
    onnx.save(proto, str(tmp_path / "unpacked.onnx"))
    a, k = example_inputs(model, batch=3, seed=9)
    out = _run(packed, _feeds(a, k))
    assert torch.equal(out, _run(tmp_path / "unpacked.onnx", _feeds(a, k)))
    assert torch.equal(out, _run(centered, _feeds(a, k)))
    weights, _, inits = _qdq_layout(onnx.load(str(centered)))
    for dq, _ in weights:
        assert inits[dq.input[0]].data_type == TensorProto.INT8
        assert not numpy_helper.to_array(inits[dq.input[2]]).any()
    with pytest.raises(dmq_fx.ConfigError, match="weights='int4'"):
        dmq_fx.export_onnx(converted, tmp_path / "x.onnx", args, kwargs, weights="int4")


def test_timestep_tables_select_the_calibrated_entry_in_onnx(tmp_path):
    """Per-timestep activation tables: the ONNX model picks the entry of the nearest calibrated
    timestep, as the lowered graph does."""
    grid = [100, 500, 900]
    model = build_unet(TINY_DDPM)
    data = []
    for i in range(3):
        (x, _), kw = example_inputs(model, batch=6, seed=50 + i)
        data.append(((x, torch.tensor(grid * 2)), kw))
    prepared = _calibrated(model, (8, 8), data, dmq_fx.PRESETS["minmax"], timestep_tables=True)
    reference = dmq_fx.convert_fx(prepared, "reference")
    x = data[0][0][0][:2]
    path = dmq_fx.export_onnx(reference, tmp_path / "tables.onnx", (x, torch.tensor([500, 500])))
    for t in (100, 301, 900):
        args = (x, torch.tensor([t, t]))
        assert _margin_db(model, reference, path, args, {}) >= TINY_MARGIN_DB, t
    # a wrong entry would show: the output at 100 with 900's steps differs from 100's
    with torch.no_grad():
        at_100 = reference(x, torch.tensor(100)).sample
    other = _run(path, {"sample": x, "timestep": torch.tensor([900, 900])})
    assert sqnr_db(
        at_100, _run(path, {"sample": x, "timestep": torch.tensor([100, 100])})
    ) > sqnr_db(at_100, other)


def test_export_refuses_what_it_cannot_export(tmp_path):
    model = build_unet(TINY_DDPM)
    data = [example_inputs(model, batch=4, seed=s) for s in range(2)]
    prepared = _calibrated(model, (8, 8), data, dmq_fx.PRESETS["minmax"])
    with pytest.raises(dmq_fx.ConvertError, match="convert_fx"):
        dmq_fx.export_onnx(prepared, tmp_path / "x.onnx", *data[0])
    converted = dmq_fx.convert_fx(prepared)
    with pytest.raises(dmq_fx.ConfigError, match="batch of at least 2"):
        dmq_fx.export_onnx(converted, tmp_path / "x.onnx", *example_inputs(model, batch=1))
    with pytest.raises(dmq_fx.ConfigError, match="opset 17"):
        dmq_fx.export_onnx(converted, tmp_path / "x.onnx", *data[0], opset=17)
    assert not (tmp_path / "x.onnx").exists()


def test_fashion28_w4a8_on_onnxruntime_within_the_bound(tmp_path):
    """The committed reference model at W4A8 with the DMQ structure: onnxruntime's outputs
    agree with the reference form at least 6 dB above the quantization error."""
    from dmq_fx_bench.reference_models import load_fashion28

    unet, _ = load_fashion28()
    data = [example_inputs(unet, batch=8, seed=s) for s in range(2)]
    prepared = _calibrated(unet, (4, 8), data, **dmq_fx.PREPARE_FLAGS["dmq"])
    converted = dmq_fx.convert_fx(prepared, "x86")
    reference = dmq_fx.convert_fx(prepared, "reference")
    path = dmq_fx.export_onnx(
        converted, tmp_path / "fashion28.onnx", *example_inputs(unet, batch=2)
    )
    margins = [
        _margin_db(unet, reference, path, *example_inputs(unet, batch=8, seed=30 + s))
        for s in range(2)
    ]
    assert min(margins) >= MARGIN_DB, margins
