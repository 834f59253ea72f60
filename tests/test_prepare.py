import pytest
import torch
from conftest import assert_unchanged, calibration_data, state_snapshot
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import PerChannelMinMaxObserver

import dmq_fx
from dmq_fx.graph.meta import quantized_layer_nodes
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs


def layer_names(model, types=(torch.nn.Conv2d, torch.nn.Linear)):
    return {n for n, m in model.named_modules() if isinstance(m, types)}


def quantized_names(prepared):
    return {n.target for n in quantized_layer_nodes(prepared)}


def test_default_mapping_keeps_spec_layers_in_float(tiny_unet):
    a, k = example_inputs(tiny_unet)
    prepared = dmq_fx.prepare_fx(tiny_unet, dmq_fx.get_default_qconfig_mapping(), a, k)
    floats = {
        n
        for n in layer_names(tiny_unet)
        if n in ("conv_in", "conv_out")
        or n.startswith(("time_embedding", "class_embedding"))
        or n.endswith("time_emb_proj")
    }
    assert floats and len(floats) >= 4
    assert quantized_names(prepared) == layer_names(tiny_unet) - floats


def test_timestep_never_reaches_an_observer():
    """Even with every layer asked to be quantized, only float tensors are observed."""
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model)
    mapping = QConfigMapping().set_global(dmq_fx.get_default_qconfig(8, 8))
    prepared = dmq_fx.prepare_fx(model, mapping, a, k)
    seen = []
    for m in prepared.modules():
        if isinstance(m, FakeQuantizeBase):
            m.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].dtype))
    dmq_fx.calibrate(prepared, calibration_data(model, n=1), progress=False)
    assert seen and all(d.is_floating_point for d in seen)
    # the time embedding MLP is quantized here (global qconfig), its int64 input never is
    assert "time_embedding.linear_1" in quantized_names(prepared)


def test_each_input_of_a_skip_concatenation_gets_its_own_observer():
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model)
    traced = dmq_fx.trace(model, a, k)
    skip_convs = {
        n.target
        for n in traced.graph.nodes
        if n.op == "call_module"
        and isinstance(traced.get_submodule(n.target), torch.nn.Conv2d)
        and n.args[0].target is torch.cat
        and n.args[0].kwargs.get("dim") == 1
    }
    assert len(skip_convs) == 6  # every decoder resnet's conv_shortcut
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(), a, k)
    for name in skip_convs:
        q0 = prepared.get_submodule(f"{name}_input_quant_0")
        q1 = prepared.get_submodule(f"{name}_input_quant_1")
        assert q0 is not q1
        assert q0.activation_post_process is not q1.activation_post_process
        node = next(n for n in prepared.graph.nodes if n.target == name)
        assert node.meta["dmq_fx"].rewrites == ["split"]
        assert [i.target for i in node.args[0].args[0]] == [
            f"{name}_input_quant_0",
            f"{name}_input_quant_1",
        ]
    # the original cat still feeds norm1 in float
    norm1 = next(n for n in prepared.graph.nodes if n.target == "up_blocks.0.resnets.0.norm1")
    assert norm1.args[0].target is torch.cat
    not_split = dmq_fx.prepare_fx(
        model, dmq_fx.get_default_qconfig_mapping(), a, k, split_concat_inputs=False
    )
    assert not any(n.meta["dmq_fx"].rewrites for n in quantized_layer_nodes(not_split))


def test_qconfig_mapping_semantics_match_torch_ao():
    model = build_unet(TINY_SD)
    a, k = example_inputs(model)
    q8 = dmq_fx.get_default_qconfig(8, 8)
    q4 = dmq_fx.get_default_qconfig(4, 6)
    mapping = (
        QConfigMapping()
        .set_global(q8)
        .set_object_type(torch.nn.Linear, None)  # no linears ...
        .set_module_name("mid_block", q4)  # ... except in mid_block
        .set_module_name("down_blocks.0", None)  # children included
        .set_module_name_regex(r"up_blocks\.1\..*\.conv2$", q4)
    )
    prepared = dmq_fx.prepare_fx(model, mapping, a, k)
    specs = {n.target: n.meta["dmq_fx"] for n in quantized_layer_nodes(prepared)}
    linears = layer_names(model, torch.nn.Linear)
    assert {n for n in specs if n in linears} == {n for n in linears if n.startswith("mid_block.")}
    assert not any(n.startswith("down_blocks.0.") for n in specs)
    assert all(
        s.weight_bits == 4 and s.act_bits == 6
        for n, s in specs.items()
        if n.startswith("mid_block.") or (n.startswith("up_blocks.1.") and n.endswith(".conv2"))
    )
    assert specs["up_blocks.0.resnets.0.conv1"].weight_bits == 8


def test_per_channel_activation_qconfig_is_rejected_by_node():
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model)
    bad = QConfig(
        activation=PerChannelMinMaxObserver.with_args(dtype=torch.quint8),
        weight=dmq_fx.get_default_qconfig().weight,
    )
    mapping = dmq_fx.get_default_qconfig_mapping().set_module_name("mid_block", bad)
    snap = state_snapshot(model)
    with pytest.raises(dmq_fx.ConfigError, match=r"node 'mid_block_resnets_0_conv1'.*per-tensor"):
        dmq_fx.prepare_fx(model, mapping, a, k)
    assert_unchanged(model, snap)


def test_prepare_calibrate_convert_never_modify_the_model():
    model = build_unet(TINY_SD)
    snap = state_snapshot(model)
    a, k = example_inputs(model)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(4, 6), a, k)
    dmq_fx.calibrate(prepared, calibration_data(model, n=1), progress=False)
    for backend in ("reference", "x86"):
        dmq_fx.convert_fx(prepared, backend)(*a, **k)
    assert_unchanged(model, snap)
    assert not any("parametrizations" in n for n, _ in model.named_modules())
