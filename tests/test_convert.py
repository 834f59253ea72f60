import functools
import os
import subprocess
import sys

import pytest
import torch
from conftest import LOWERED_MIN_SQNR_DB, prepared_and_calibrated, state_snapshot

import dmq_fx
import dmq_fx.lowering.convert as convert_module
from dmq_fx.graph.meta import graph_state
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.lowering.quantized_modules import (
    QuantizedLayer,
    cpu_has_int8_dot_product,
    int16_pair_bound,
    quantize_uint8,
)
from dmq_fx.metrics import sqnr_db

qd = torch.ops.quantized_decomposed
BITS = [(8, 8), (4, 8), (4, 6)]
MODELS = {"ddpm": TINY_DDPM, "sd": TINY_SD}


@functools.cache
def graphs(model_name, wb, ab):
    model = build_unet(MODELS[model_name])
    sim = prepared_and_calibrated(model, wb, ab)
    return model, sim, dmq_fx.convert_fx(sim, "reference"), dmq_fx.convert_fx(sim, "x86")


def capture(gm, module_filter, pre=False):
    out, handles = {}, []
    for name, mod in gm.named_modules():
        if module_filter(name, mod):
            if pre:
                h = mod.register_forward_pre_hook(lambda m, i, n=name: out.__setitem__(n, i))
            else:
                h = mod.register_forward_hook(lambda m, i, o, n=name: out.__setitem__(n, (i, o)))
            handles.append(h)
    return out, handles


def output_step(y):
    """One step of an 8-bit quantization of ``y``'s range: the unit of the issue's tolerance."""
    return (y.max() - y.min()).item() / 255


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("wb,ab", BITS)
def test_native_equals_reference_at_every_layer(model_name, wb, ab):
    model, _, ref, nat = graphs(model_name, wb, ab)
    a, k = example_inputs(model, batch=3, seed=7)
    caps, handles = capture(ref, lambda n, m: isinstance(m, QuantizedLayer))
    with torch.no_grad():
        ref(*a, **k)
        for h in handles:
            h.remove()
        assert len(caps) == sum(isinstance(m, QuantizedLayer) for m in nat.modules())
        for name, (inputs, ref_out) in caps.items():
            layer = nat.get_submodule(name)
            if layer.form == "int8":
                inputs = [quantize_uint8(x, *layer.act_qparams[g]) for g, x in enumerate(inputs)]
            err = (layer(*inputs) - ref_out).abs().max().item()
            assert err <= 0.01 * output_step(ref_out), name


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("wb,ab", BITS)
def test_reference_equals_simulation_at_every_layer(model_name, wb, ab):
    model, sim, ref, _ = graphs(model_name, wb, ab)
    a, k = example_inputs(model, batch=3, seed=8)
    # float inputs of every activation quantizer of the simulation
    caps, handles = capture(
        sim, lambda n, m: n.endswith(("_input_quant", "_input_quant_0", "_input_quant_1")), pre=True
    )
    with torch.no_grad():
        sim(*a, **k)
        for h in handles:
            h.remove()
        for name, layer in ref.named_modules():
            if not isinstance(layer, QuantizedLayer):
                continue
            n = layer.num_groups
            keys = [f"{name}_input_quant" + (f"_{g}" if n > 1 else "") for g in range(n)]
            xs = [caps[key][0] for key in keys]
            sim_in = [sim.get_submodule(key)(x) for key, x in zip(keys, xs)]
            sim_out = sim.get_submodule(name)(torch.cat(sim_in, 1) if n > 1 else sim_in[0])
            ref_in = [
                qd.dequantize_per_tensor(
                    qd.quantize_per_tensor(x, *p, torch.uint8), *p, torch.uint8
                )
                for x, p in zip(xs, layer.act_qparams)
            ]
            err = (layer(*ref_in) - sim_out).abs().max().item()
            assert err <= 0.01 * output_step(sim_out), name


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("wb,ab", BITS)
def test_unet_outputs_agree_within_the_documented_tolerance(model_name, wb, ab):
    """End to end, float rounding differences flip a few integers that later layers amplify
    (random-weight UNets); the documented bound is absolute (conftest.LOWERED_MIN_SQNR_DB)."""
    model, sim, ref, nat = graphs(model_name, wb, ab)
    a, k = example_inputs(model, batch=2, seed=9)
    with torch.no_grad():
        fp, s, r, n = (g(*a, **k).sample for g in (model, sim, ref, nat))
    q_err = (s - fp).norm()
    assert q_err > 0
    assert sqnr_db(s, r) >= LOWERED_MIN_SQNR_DB
    assert sqnr_db(r, n) >= LOWERED_MIN_SQNR_DB


def test_reference_graph_keeps_exact_low_bit_ranges():
    _, _, ref, _ = graphs("sd", 4, 6)
    qnodes = [n for n in ref.graph.nodes if n.target is qd.quantize_per_tensor.default]
    dqnodes = [n for n in ref.graph.nodes if n.target is qd.dequantize_per_tensor.default]
    layers = [m for m in ref.modules() if isinstance(m, QuantizedLayer)]
    assert len(qnodes) == len(dqnodes) == sum(m.num_groups for m in layers)
    assert all(n.args[3:6] == (0, 63, torch.uint8) for n in qnodes + dqnodes)
    for m in layers:
        assert (m.weight_quant_min, m.weight_quant_max) == (0, 15)
        for g in range(m.num_groups):
            w, zp = getattr(m, f"weight_int_{g}"), getattr(m, f"weight_zero_point_{g}")
            assert w.dtype == torch.uint8 and int(w.max()) <= 15
            assert int(zp.min()) >= 0 and int(zp.max()) <= 15
            assert int(m.integer_weight(g).min()) >= -15 and int(m.integer_weight(g).max()) <= 15


def test_native_graph_structure():
    _, sim, _, nat = graphs("ddpm", 4, 8)
    layers = {n: m for n, m in nat.named_modules() if isinstance(m, QuantizedLayer)}
    assert set(layers) == {n.target for n in sim.graph.nodes if "dmq_fx" in n.meta}
    assert all(m.form == "int8" for m in layers.values())
    quantize_nodes = [n for n in nat.graph.nodes if n.target is quantize_uint8]
    assert len(quantize_nodes) == sum(m.num_groups for m in layers.values())
    assert not any(
        n.target in (qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default)
        for n in nat.graph.nodes
    )
    assert "up_blocks_0_resnets_0_conv_shortcut_input_q_1" in nat.code
    assert not any(isinstance(m, torch.ao.quantization.FakeQuantizeBase) for m in nat.modules())


@pytest.mark.parametrize("int8_dot_product", [True, False], ids=["vnni", "avx2"])
@pytest.mark.parametrize("wb,ab", BITS)
def test_layer_form_follows_the_int16_saturation_bound(wb, ab, int8_dot_product, monkeypatch):
    """Both decisions on every machine: the CPU's answer is forced."""
    _, sim, _, _ = graphs("ddpm", wb, ab)
    monkeypatch.setattr(convert_module, "cpu_has_int8_dot_product", lambda: int8_dot_product)
    nat = dmq_fx.convert_fx(sim, "x86")
    forms = {}
    for name, m in nat.named_modules():
        if not isinstance(m, QuantizedLayer):
            continue
        bound = max(
            int16_pair_bound(m.integer_weight(g), m.act_qparams[g][3]) for g in range(m.num_groups)
        )
        expected = "int8" if int8_dot_product or bound <= 32767 else "reference"
        assert m.form == expected, name
        forms[name] = m.form
    expected_forms = {"reference"} if (wb, ab) == (8, 8) and not int8_dot_product else {"int8"}
    assert set(forms.values()) == expected_forms


def test_avx2_kernels_saturate_and_the_fallback_keeps_layers_exact():
    """Under ``ONEDNN_MAX_CPU_ISA=AVX2`` (onednn's AVX2 int8 kernels, on any x86 CPU): the
    kernel saturates, dmq_fx detects it, and every layer of a converted W8A8 / W8A7 / W4A8
    graph still equals the reference form (layers over the bound fall back to it); forcing
    int8 kernels on the W8A8 layers breaks that (tests/isa_check.py)."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", OMP_NUM_THREADS="1")
    script = os.path.join(os.path.dirname(__file__), "isa_check.py")
    done = subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "checked: saturation, detection, fallback exact, forced int8 wrong" in done.stdout


def test_int8_dot_product_detection_runs_the_kernel():
    """The decision is the kernel's own behaviour on the saturating case, not the CPU flags."""
    x = torch.full((1, 64), 255, dtype=torch.uint8)
    w = torch.full((8, 64), 127, dtype=torch.int8)
    out = torch.ops.onednn.qlinear_pointwise(
        x, 1.0, 0, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(8),
        torch.zeros(8, dtype=torch.int32), None, 1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip
    exact = bool((out == 255.0 * 127 * 64).all())
    assert cpu_has_int8_dot_product() == exact
    assert int16_pair_bound(w, 255) > 32767


def test_converted_graph_batch_timestep_and_return_dict():
    """Any batch size and every timestep form: the lowered graph's output against the
    simulation's (the end-to-end bound of test_unet_outputs_agree...), and the timestep forms of
    one call give the same numbers."""
    model, sim, _, nat = graphs("ddpm", 4, 8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for batch, t in ((1, 5), (7, torch.tensor(5)), (3, torch.tensor([1, 200, 900]))):
            x = torch.randn(batch, 3, 16, 16, generator=g)
            out = nat(x, t).sample
            fp, s = model(x, t).sample, sim(x, t).sample
            assert sqnr_db(s, out) >= LOWERED_MIN_SQNR_DB and not torch.equal(s, fp), (batch, t)
            tuple_out = nat(x, t, return_dict=False)
            assert isinstance(tuple_out, tuple) and torch.equal(tuple_out[0], out)
        x = torch.randn(4, 3, 16, 16, generator=g)
        scalar = nat(x, 5).sample
        for same in (torch.tensor(5), torch.tensor([5]), torch.full((4,), 5)):
            assert torch.equal(nat(x, same).sample, scalar), same
    with pytest.raises(dmq_fx.InputMismatchError, match="traced for shape"):
        nat(torch.randn(1, 3, 8, 8), 5)


def test_convert_errors_and_no_side_effects():
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(), a, k)
    with pytest.raises(dmq_fx.ConvertError, match="run dmq_fx.calibrate"):
        dmq_fx.convert_fx(prepared)
    _, sim, _, _ = graphs("ddpm", 8, 8)
    with pytest.raises(dmq_fx.ConvertError, match="unknown backend 'fbgemm2'.*reference"):
        dmq_fx.convert_fx(sim, "fbgemm2")
    with pytest.raises(dmq_fx.ConvertError, match="expects the graph from"):
        dmq_fx.convert_fx(model)
    snap = state_snapshot(sim)
    dmq_fx.convert_fx(sim, "x86")
    now = sim.state_dict()
    assert all(torch.equal(now[key], v) for key, v in snap[0].items())
    assert graph_state(sim).state == "calibrated"


@pytest.mark.parametrize("axis,shape", [(1, (4, 32, 9, 9)), (2, (4, 77, 64)), (1, (2, 5, 3))])
def test_per_channel_quantize_of_int8_layers_matches_quantized_decomposed(axis, shape):
    """LES / PTS inputs of int8 layers use a three-pass per-channel quantize: the same integers
    as torch's quantized_decomposed.quantize_per_channel, ties and clamping included."""
    from dmq_fx.lowering.quantized_modules import quantize_uint8_per_channel

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3
    steps = torch.rand(shape[axis], generator=g) * 0.05 + 0.001
    x.select(axis, 0).copy_(steps[0] * 0.5)  # exact .5 ties in channel 0
    zero_points = torch.full((shape[axis],), 7, dtype=torch.int32)
    expected = torch.ops.quantized_decomposed.quantize_per_channel(
        x, steps, zero_points, axis, 0, 63, torch.uint8
    )
    assert torch.equal(quantize_uint8_per_channel(x, 1.0 / steps, 7, axis, 0, 63), expected)


class _ReadsWeightDtype(torch.nn.Module):
    """As diffusers' IP-Adapter image projection: ``x.to(self.lin.weight.dtype)``."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x.to(self.lin.weight.dtype))


class _ComputesWithWeight(_ReadsWeightDtype):
    def forward(self, x):
        return self.lin(x) + self.lin.weight.sum()


def test_float_weight_metadata_reads_convert_and_weight_math_is_refused():
    x = torch.randn(4, 8)
    for cls in (_ReadsWeightDtype, _ComputesWithWeight):
        model = cls().eval()
        prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(8, 8), (x,))
        dmq_fx.calibrate(prepared, [(x,)], progress=False)
        if cls is _ReadsWeightDtype:
            lowered = dmq_fx.convert_fx(prepared, "reference")
            assert isinstance(lowered.get_submodule("lin"), QuantizedLayer)
            with torch.no_grad():
                torch.testing.assert_close(lowered(x), prepared(x), atol=1e-5, rtol=0)
        else:
            with pytest.raises(dmq_fx.ConvertError, match="float weight of quantized layer 'lin'"):
                dmq_fx.convert_fx(prepared, "reference")
