"""Automatic mixed precision: per-layer weight sensitivity and the 8-bit choice under a budget."""

import copy
import math

import pytest
import torch
from conftest import calibration_data, state_snapshot

import dmq_fx
from dmq_fx.graph.meta import quantized_layer_nodes
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.methods.mixed_precision import _quantized_weight
from dmq_fx.metrics import sqnr_db


def _data(model, n=2):
    return [example_inputs(model, batch=4, seed=40 + s) for s in range(n)]


def test_sensitivity_is_the_output_sqnr_with_one_layer_quantized():
    model = build_unet(TINY_SD)
    data = _data(model)
    before = state_snapshot(model)
    sensitivity = dmq_fx.weight_sensitivity(model, data, 4, progress=False)
    # every layer prepare_fx quantizes, nothing else
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(4, 8), *data[0])
    assert set(sensitivity) == {n.target for n in quantized_layer_nodes(prepared)}
    # the model is untouched: same state, no hook left behind
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())
    # one layer by hand: its weight replaced in a copy, the output compared with the float one
    name = min(sensitivity, key=sensitivity.get)
    edited = copy.deepcopy(model)
    layer = edited.get_submodule(name)
    with torch.no_grad():
        layer.weight.copy_(_quantized_weight(layer.weight, 4))
        fp = torch.cat([model(*a, **k).sample for a, k in data])
        q = torch.cat([edited(*a, **k).sample for a, k in data])
    assert sensitivity[name] == pytest.approx(sqnr_db(fp, q), abs=1e-3)
    assert math.isfinite(sensitivity[name]) and sensitivity[name] < max(sensitivity.values())


def test_mixed_precision_spends_the_budget_on_the_most_damaging_layers(tmp_path):
    model = build_unet(TINY_DDPM)
    data = _data(model)
    choice = dmq_fx.mixed_precision_mapping(model, data, 4, 8, budget_bits=5.0, progress=False)
    sizes = {n: model.get_submodule(n).weight.numel() for n in choice.sensitivity}
    total = sum(sizes.values())
    chosen = set(choice.eight_bit)
    assert chosen and chosen != set(sizes)
    effective = sum((8 if n in chosen else 4) * s for n, s in sizes.items()) / total
    assert choice.effective_bits == pytest.approx(effective) and effective <= 5.0
    # the greedy knapsack: the layer adding most noise per parameter comes first, and no layer
    # left out would still fit the budget
    damage = {n: 10 ** (-db / 10) / sizes[n] for n, db in choice.sensitivity.items()}
    assert choice.eight_bit[0] == max(damage, key=damage.get)
    assert all(effective + 4 * sizes[n] / total > 5.0 for n in set(sizes) - chosen)

    # prepare_fx follows the mapping; the lowered graph keeps 8-bit weights where chosen
    prepared = dmq_fx.prepare_fx(model, choice.mapping, *example_inputs(model, batch=4))
    bits = {n.target: n.meta["dmq_fx"].weight_bits for n in quantized_layer_nodes(prepared)}
    assert bits == {n: 8 if n in chosen else 4 for n in sizes}
    dmq_fx.calibrate(prepared, calibration_data(model), progress=False)
    names = {n.target: n.name for n in quantized_layer_nodes(prepared)}
    converted = dmq_fx.convert_fx(prepared, "x86")
    rows = {r["node"]: r for r in dmq_fx.summary(converted).rows}
    assert all(rows[names[n]]["weight"].startswith(f"{bits[n]}b") for n in sizes)
    # the file records each layer's width: both load forms rebuild the same graph
    dmq_fx.save(converted, tmp_path / "mixed.safetensors", standalone=True)
    a, k = example_inputs(model, batch=2, seed=5)
    with torch.no_grad():
        out = converted(*a, **k).sample
        assert torch.equal(dmq_fx.load(tmp_path / "mixed.safetensors")(*a, **k).sample, out)
        again = dmq_fx.load(tmp_path / "mixed.safetensors", model)(*a, **k).sample
        assert torch.equal(again, out)

    # a budget at the low width changes nothing, at 8 bits every layer is upgraded
    none = dmq_fx.mixed_precision_mapping(model, data, 4, 8, budget_bits=4.0, progress=False)
    every = dmq_fx.mixed_precision_mapping(model, data, 4, 8, budget_bits=8.0, progress=False)
    assert none.eight_bit == () and none.effective_bits == 4.0
    assert set(every.eight_bit) == set(sizes) and every.effective_bits == 8.0
    with pytest.raises(dmq_fx.ConfigError, match="budget_bits=3.5"):
        dmq_fx.mixed_precision_mapping(model, data, 4, 8, budget_bits=3.5, progress=False)


def test_mixed_precision_lowers_the_output_error():
    """Half a bit more on average, spent on the most damaging layers, recovers much of the
    4-bit loss (minmax calibration, same data)."""
    model = build_unet(TINY_DDPM)
    data = calibration_data(model)
    a, k = example_inputs(model, batch=4, seed=77)
    with torch.no_grad():
        fp = model(*a, **k).sample
    errors = {}
    for budget in (None, 4.5):
        mapping = dmq_fx.get_default_qconfig_mapping(4, 8)
        if budget is not None:
            mapping = dmq_fx.mixed_precision_mapping(
                model, data, 4, 8, budget_bits=budget, progress=False
            ).mapping
        prepared = dmq_fx.prepare_fx(model, mapping, *data[0])
        dmq_fx.calibrate(prepared, data, progress=False)
        with torch.no_grad():
            errors[budget] = sqnr_db(fp, dmq_fx.convert_fx(prepared, "x86")(*a, **k).sample)
    assert errors[4.5] >= errors[None] + 1.0, errors


def test_quantize_pipeline_with_mixed_precision():
    from diffusers import DDIMScheduler, DDPMPipeline

    pipe = DDPMPipeline(unet=build_unet(TINY_DDPM), scheduler=DDIMScheduler())
    fast = {"num_inference_steps": 4, "samples_per_step": 4, "batch_size": 8}
    config = {"preset": "minmax", "mixed_precision_bits": 5.0, **fast}
    q = dmq_fx.quantize_pipeline(pipe, config, progress=False)
    widths = [r["weight"].split("b")[0] for r in dmq_fx.summary(q.unet.graph).rows]
    assert "8" in widths and "4" in widths
    with pytest.raises(dmq_fx.ConfigError, match="mixed_precision_bits=9"):
        dmq_fx.QuantizationConfig(mixed_precision_bits=9)


def test_upgraded_layers_keep_the_mappings_activation_quantizer():
    """Only the weight width changes: with histogram activation ranges in the base mapping, the
    8-bit layers observe their activations with histograms too."""
    from dmq_fx.observers import HistogramRangeObserver

    model = build_unet(TINY_DDPM)
    base = dmq_fx.get_default_qconfig_mapping(4, 6, activation_ranges="histogram")
    choice = dmq_fx.mixed_precision_mapping(
        model, _data(model), 4, 6, budget_bits=5.0, mapping=base, progress=False
    )
    prepared = dmq_fx.prepare_fx(model, choice.mapping, *example_inputs(model, batch=4))
    specs = {n.target: n.meta["dmq_fx"] for n in quantized_layer_nodes(prepared)}
    assert choice.eight_bit
    for name, spec in specs.items():
        assert spec.weight_bits == (8 if name in choice.eight_bit else 4)
        assert spec.act_bits == 6
        assert isinstance(spec.qconfig.activation(), HistogramRangeObserver), name
