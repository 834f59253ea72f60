import pytest
import torch
from conftest import calibration_data
from dmq_fx.passes import integer_weight, weight_before_quantization, weight_quantizer
from hypothesis import given, settings
from hypothesis import strategies as st

import dmq_fx
from dmq_fx.graph.meta import quantized_layer_nodes
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.graph.units import capture_unit_inputs, reconstruction_units, unit_graph
from dmq_fx.lowering.quantized_modules import QuantizedLayer
from dmq_fx.methods.adaround import AdaRound, _initial_v, output_loss, rectified_sigmoid
from dmq_fx.methods.timestep_weighting import calibration_timesteps
from dmq_fx.quantize.modes import input_quantizers, weight_quantizers
from dmq_fx.quantize.stage import CalibrationContext


def _observed(config, wb=4, ab=8, les=False):
    model = build_unet(config)
    a, k = example_inputs(model, batch=4)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(wb, ab), a, k, les=les)
    data = calibration_data(model)
    dmq_fx.calibrate(prepared, data, ("observe_activations", "observe_weights"), progress=False)
    return model, prepared, data


def _weights_only(gm, on: bool):
    for fq in input_quantizers(gm):
        fq.disable_fake_quant()
    for fq in weight_quantizers(gm):
        (fq.enable_fake_quant if on else fq.disable_fake_quant)()


@given(st.lists(st.floats(0.0, 0.999), min_size=1, max_size=20))
@settings(max_examples=30, deadline=None)
def test_initial_rounding_variable_reproduces_the_fraction(rest):
    rest = torch.tensor(rest, dtype=torch.float64)
    assert torch.allclose(rectified_sigmoid(_initial_v(rest)), rest, atol=1e-9)


def test_beta_schedule_by_hand():
    stage = AdaRound(iterations=100, warmup=0.2, beta_start=20, beta_end=2)
    assert stage.beta(0) == stage.beta(19) == 20
    assert stage.beta(20) == pytest.approx(20)
    assert stage.beta(60) == pytest.approx(11)
    assert stage.beta(100) == pytest.approx(2)


def test_integer_weight_with_nearest_rounding_equals_round_to_nearest():
    _, gm, _ = _observed(TINY_DDPM)
    for node in quantized_layer_nodes(gm):
        layer = gm.get_submodule(node.target)
        grouped = weight_quantizer(layer)
        for fq, w in zip(grouped.fake_quants, grouped.split(weight_before_quantization(layer))):
            s = fq.scale.reshape(-1, *([1] * (w.dim() - 1)))
            scaled = w.detach() * (1.0 / s)
            up = (scaled - torch.floor(scaled) >= 0.5).float()
            z = fq.zero_point.reshape(s.shape).float()
            rtn = torch.clamp(torch.round(scaled) + z, fq.quant_min, fq.quant_max)
            mismatch = integer_weight(w, fq, up) != rtn
            # only exact .5 ties may differ (torch.round rounds half to even)
            frac = (scaled - torch.floor(scaled))[mismatch]
            assert torch.all(frac == 0.5), node.name


def test_units_cover_every_quantized_layer_and_reproduce_the_graph():
    for config in (TINY_DDPM, TINY_SD):
        _, gm, data = _observed(config)
        _weights_only(gm, False)
        units = reconstruction_units(gm)
        covered = [n for u in units for n in u.layers]
        assert covered == quantized_layer_nodes(gm)
        kinds = {u.kind for u in units}
        assert kinds == {"block", "layer"}
        for unit in units:
            sub, inputs, outputs = unit_graph(gm, unit)
            captured_in = capture_unit_inputs(gm, inputs, data[:1], None)
            captured_out = capture_unit_inputs(gm, outputs, data[:1], None)
            with torch.no_grad():
                got = sub(*captured_in.values)
            for value, expected in zip(got, captured_out.values):
                if isinstance(value, torch.Tensor):
                    assert torch.allclose(value, expected, atol=1e-5), unit.name


@pytest.mark.parametrize("weighting", ["uniform", "adaptive"])
def test_adaround_lowers_the_block_output_error(weighting):
    _, gm, data = _observed(TINY_DDPM, wb=3)
    _weights_only(gm, False)
    unit = next(u for u in reconstruction_units(gm) if u.kind == "block" and len(u.layers) == 3)
    sub, inputs, _ = unit_graph(gm, unit)
    x = capture_unit_inputs(gm, inputs, data, None).values
    layers = [weight_quantizer(gm.get_submodule(n.target)) for n in unit.layers]

    def error():
        for grouped in layers:
            for fq in grouped.fake_quants:
                fq.enable_fake_quant()
        with torch.no_grad():
            out = sub(*x)[0]
        for grouped in layers:
            for fq in grouped.fake_quants:
                fq.disable_fake_quant()
        return (out - target).pow(2).mean().item()

    with torch.no_grad():
        target = sub(*x)[0]
    nearest = error()
    stage = AdaRound(iterations=300, lr=1e-2, timestep_weighting=weighting)
    timesteps = calibration_timesteps(gm, data, None) if weighting == "adaptive" else None
    stage.learn_unit(gm, unit, data, seed=0, timesteps=timesteps)
    for grouped in layers:
        for g in range(len(grouped.fake_quants)):
            assert set(grouped.rounding(g).unique().tolist()) <= {0, 1}
    assert error() < 0.8 * nearest
    assert all("adaround" in n.meta["dmq_fx"].rewrites for n in unit.layers)


@pytest.mark.parametrize("config", [TINY_DDPM, TINY_SD], ids=["ddpm", "sd"])
def test_learned_rounding_is_what_convert_stores(config):
    model, gm, data = _observed(config, les=True)
    dmq_fx.calibrate(gm, data, [AdaRound(iterations=4, max_samples=8)], progress=False)
    a, k = example_inputs(model, batch=3, seed=5)
    lowered = dmq_fx.convert_fx(gm, backend="reference")
    for node in quantized_layer_nodes(gm):
        layer = gm.get_submodule(node.target)
        grouped = weight_quantizer(layer)
        weights = grouped.split(weight_before_quantization(layer))
        stored = lowered.get_submodule(node.target)
        assert isinstance(stored, QuantizedLayer)
        for g, (fq, w) in enumerate(zip(grouped.fake_quants, weights)):
            expected = integer_weight(w.detach(), fq, grouped.rounding(g).float())
            # held packed: one byte per eight weights
            assert getattr(grouped, f"rounding_{g}").numel() == -(-w.numel() // 8)
            assert torch.equal(getattr(stored, f"weight_int_{g}").float(), expected), node.name
    with torch.no_grad():
        sim = gm(*a, **k).sample
        low = lowered(*a, **k).sample
    step = (sim.max() - sim.min()) / 255
    assert (low - sim).abs().max() <= 0.05 * step
    rows = dmq_fx.summary(lowered).rows
    assert all("adaround" in r["dmq"] for r in rows)


def test_adaround_is_deterministic_and_needs_weight_qparams():
    runs = []
    for _ in range(2):
        _, gm, data = _observed(TINY_DDPM)
        AdaRound(iterations=5, max_samples=8, seed=3)(gm, CalibrationContext(data, progress=False))
        runs.append(
            [
                weight_quantizer(gm.get_submodule(n.target)).rounding(0)
                for n in quantized_layer_nodes(gm)
            ]
        )
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model, batch=4)
    fresh = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(4, 8), a, k)
    with pytest.raises(dmq_fx.ConfigError, match="observe_weights"):
        dmq_fx.calibrate(fresh, calibration_data(model), ["adaround"], progress=False)


def test_observing_weights_again_drops_the_learned_rounding():
    _, gm, data = _observed(TINY_DDPM)
    AdaRound(iterations=2, max_samples=8)(gm, CalibrationContext(data, progress=False))
    node = quantized_layer_nodes(gm)[0]
    assert weight_quantizer(gm.get_submodule(node.target)).rounding(0) is not None
    dmq_fx.calibrate(gm, data, ["observe_weights"], progress=False)
    assert weight_quantizer(gm.get_submodule(node.target)).rounding(0) is None
    assert "adaround" not in node.meta["dmq_fx"].rewrites


def test_presets_list_adaround_after_the_weight_observation():
    for name in ("adaround", "les+adaround", "les+adaround-paper"):
        stages = dmq_fx.PRESETS[name]
        assert (
            stages.index("observe_weights")
            < [i for i, s in enumerate(stages) if "adaround" in s][0]
        )


def test_relative_loss_weighs_samples_by_their_signal_to_noise_ratio():
    # two samples (N, C, H, W): the second's target and error are 10x the first's
    target = torch.ones(2, 3, 2, 2)
    target[1] *= 10
    pred = target * 1.1  # both at the same 10% relative error
    plain = output_loss(pred, target)
    assert plain.item() == pytest.approx(((0.1**2 * 3) + (1.0**2 * 3)) / 2)
    energy = torch.tensor([3.0, 300.0])
    # each sample's error / energy is 0.01; times the mean energy: MSE's scale
    assert output_loss(pred, target, relative=True).item() == pytest.approx(0.01 * energy.mean())
    # the low-energy sample weighs as much as the high-energy one: doubling its relative error
    # raises the plain loss by 3%, the relative loss by 150%
    worse = pred.clone()
    worse[0] = target[0] * 1.2
    assert output_loss(worse, target).item() / plain.item() == pytest.approx(1.0297, abs=1e-3)
    assert output_loss(worse, target, relative=True).item() == pytest.approx(
        (0.04 + 0.01) / 2 * energy.mean()
    )
    # equal energies: relative and plain agree; an all-zero target stays finite
    same = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    flat = same / same.pow(2).sum(1, keepdim=True).mean(2, keepdim=True).sqrt()
    noisy = flat + 0.1
    assert output_loss(noisy, flat, True).item() == pytest.approx(output_loss(noisy, flat).item())
    zero = torch.zeros(2, 3)
    assert output_loss(torch.ones(2, 3), zero, relative=True).item() == pytest.approx(3.0)
