"""fp16 / bf16 UNets through prepare / calibrate / convert: quantized layers compute in float32
(their integers and steps as in a float32 model), float layers in the model's dtype, and every
graph returns the model's dtype."""

import copy
import functools

import pytest
import torch
from conftest import calibration_data, cheap_stages
from layer_values import (
    lowered_layer_outputs,
    node_values,
    reference_inputs,
    simulated_layer_outputs,
    without_rounding_ties,
)

import dmq_fx
from dmq_fx.graph.meta import quantized_layer_nodes
from dmq_fx.graph.unet_configs import TINY_SD, build_unet, example_inputs
from dmq_fx.lowering.quantized_modules import QuantizedLayer
from dmq_fx.metrics import sqnr_db


def _cast(batch, dtype):
    (x, t), kwargs = batch
    return (x.to(dtype), t), {k: v.to(dtype) for k, v in kwargs.items()}


@functools.cache
def _graphs(preset, dtype):
    float32 = build_unet(TINY_SD)
    model = copy.deepcopy(float32).to(dtype)
    a, k = _cast(example_inputs(float32, batch=4), dtype)
    spec = dmq_fx.PRESETS[preset]
    prepared = dmq_fx.prepare_fx(
        model, dmq_fx.get_default_qconfig_mapping(4, 8), a, k, **spec.prepare_flags
    )
    data = [_cast(b, dtype) for b in calibration_data(float32)]
    dmq_fx.calibrate(prepared, data, cheap_stages(preset), progress=False)
    lowered = {b: dmq_fx.convert_fx(prepared, b) for b in ("reference", "x86")}
    return float32, model, prepared, lowered


@pytest.mark.parametrize(
    "preset,dtype",
    [(p, torch.bfloat16) for p in ("minmax", "les", "pts", "dmq", "adaround", "eda-dm")]
    + [("dmq", torch.float16)],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_half_precision_unet_quantizes_in_every_preset(preset, dtype):
    float32, model, prepared, lowered = _graphs(preset, dtype)
    a, k = _cast(example_inputs(float32, batch=3, seed=9), dtype)
    with torch.no_grad():
        outputs = {"sim": prepared(*a, **k).sample}
        outputs.update({b: g(*a, **k).sample for b, g in lowered.items()})
    assert all(o.dtype == dtype for o in outputs.values())
    # float layers stay in the model's dtype, quantized ones hold float32 steps and bias
    graph = lowered["x86"]
    assert graph.get_submodule("conv_in").weight.dtype == dtype
    layers = [m for m in graph.modules() if isinstance(m, QuantizedLayer)]
    assert layers and all(m.bias is None or m.bias.dtype == torch.float32 for m in layers)
    # every lowered layer equals the simulation on identical inputs (float32 at those layers)
    env = {n: node_values(g, a, k) for n, g in (("sim", prepared), *lowered.items())}
    x0s = without_rounding_ties(prepared, lowered["reference"], reference_inputs(
        lowered["reference"], env["reference"]))  # fmt: skip
    ref_out = lowered_layer_outputs(lowered["reference"], env["reference"], x0s)
    nat_out = lowered_layer_outputs(graph, env["x86"], x0s)
    sim_out = simulated_layer_outputs(prepared, env["sim"], lowered["reference"], x0s)
    assert set(ref_out) == {n.target for n in quantized_layer_nodes(prepared)}
    for name, r in ref_out.items():
        assert r.dtype == torch.float32
        step = (r.max() - r.min()).item() / 255
        assert (nat_out[name] - r).abs().max().item() <= 0.01 * step, name
        assert (sim_out[name] - r).abs().max().item() <= 0.01 * step, name


def test_half_precision_costs_no_quality_against_float32():
    """The bf16 UNet quantized with a preset is as close to the float32 UNet as the float32 UNet
    quantized with it (within 1 dB; benchmarks/half_precision.py gives the figures)."""
    float32, _, _, lowered = _graphs("minmax", torch.bfloat16)
    a, k = example_inputs(float32, batch=3, seed=9)
    a16, k16 = _cast((a, k), torch.bfloat16)
    prepared32 = dmq_fx.prepare_fx(float32, dmq_fx.get_default_qconfig_mapping(4, 8), a, k)
    dmq_fx.calibrate(prepared32, calibration_data(float32), progress=False)
    with torch.no_grad():
        fp = float32(*a, **k).sample
        q32 = dmq_fx.convert_fx(prepared32, "x86")(*a, **k).sample
        q16 = lowered["x86"](*a16, **k16).sample.float()
    assert sqnr_db(fp, q16) >= sqnr_db(fp, q32) - 1.0
