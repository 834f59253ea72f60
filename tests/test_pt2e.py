import pytest
import torch
from conftest import LOWERED_MIN_SQNR_DB, calibration_data

# torchao is in the test extra: a missing or broken install fails here, loudly
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.metrics import sqnr_db
from dmq_fx.pt2e import DMQQuantizer, export_unet, prepare_float_model

QD = torch.ops.quantized_decomposed


def _sample(out):
    return out[0] if isinstance(out, tuple) else out.sample


@pytest.mark.parametrize("config", [TINY_DDPM, TINY_SD], ids=["ddpm", "sd"])
def test_pt2e_with_the_learned_state_agrees_with_the_fx_graph(config):
    model = build_unet(config)
    a, k = example_inputs(model, batch=4)
    prepared = dmq_fx.prepare_fx(
        model, dmq_fx.get_default_qconfig_mapping(4, 8), a, k, les=True, split_concat_inputs=False
    )
    stages = [
        dmq_fx.LearnLES(iterations=3, max_samples=8),
        "observe_activations",
        "observe_weights",
        dmq_fx.AdaRound(iterations=3, max_samples=8),
    ]
    dmq_fx.calibrate(prepared, calibration_data(model), stages, progress=False)
    quantizer = DMQQuantizer(calibrated=prepared)
    assert quantizer.skipped == [] and len(quantizer.layers) == len(dmq_fx.summary(prepared).rows)
    pt2e = prepare_pt2e(export_unet(prepare_float_model(model, prepared), a, k), quantizer)
    with torch.no_grad():
        pt2e(*a, **k)
    pt2e = convert_pt2e(pt2e)
    quantize_nodes = [n for n in pt2e.graph.nodes if n.target == QD.quantize_per_tensor.default]
    assert len(quantize_nodes) == len(quantizer.layers)
    x, kw = example_inputs(model, batch=3, seed=7)
    with torch.no_grad():
        fp = model(*x, **kw).sample
        sim = prepared(*x, **kw).sample
        assert not torch.equal(sim, fp)
        got = _sample(pt2e(*x, **kw))
        lowered = dmq_fx.convert_fx(prepared, "reference")(*x, **kw).sample
    step = (sim.max() - sim.min()) / 255
    assert (got - sim).abs().max() <= step  # within one quantization step of the FX simulation
    assert sqnr_db(lowered, got) >= LOWERED_MIN_SQNR_DB  # and of the lowered FX graph


def test_pt2e_without_state_keeps_exact_low_bit_ranges():
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model, batch=2)
    pt2e = prepare_pt2e(export_unet(model, a, k), DMQQuantizer(weight_bits=4, act_bits=6))
    with torch.no_grad():
        for args, kwargs in calibration_data(model):
            pt2e(*args, **kwargs)
    pt2e = convert_pt2e(pt2e, fold_quantize=False)
    acts = [n for n in pt2e.graph.nodes if n.target == QD.quantize_per_tensor.default]
    weights = [n for n in pt2e.graph.nodes if n.target == QD.quantize_per_channel.default]
    assert acts and all(n.args[3:5] == (0, 63) for n in acts)
    assert weights and all(n.args[4:6] == (0, 15) for n in weights)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(4, 6), a, k)
    layers = [n for n in prepared.graph.nodes if "dmq_fx" in n.meta]
    fed = [
        n
        for n in pt2e.graph.nodes
        if n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
        and n.args[0].target == QD.dequantize_per_tensor.default
    ]
    assert len(fed) == len(layers)  # the same layers as dmq_fx (conv_in, conv_out... float)
    with pytest.raises(dmq_fx.ConfigError, match="weight_bits"):
        DMQQuantizer(weight_bits=9)
