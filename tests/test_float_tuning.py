"""Output-matched tuning of the float parameters (dmq_fx.methods.float_tuning)."""

import copy

import pytest
import torch
from conftest import (
    assert_needs_observed_qparams,
    assert_unchanged,
    calibration_data,
    state_snapshot,
)

import dmq_fx
from dmq_fx.graph.meta import graph_state
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.methods.float_tuning import TuneFloatParameters, float_parameters
from dmq_fx.metrics import sqnr_db
from dmq_fx.quantize.modes import quantizer_mode
from dmq_fx.quantize.stage import CalibrationContext
from dmq_fx.quantize.state import learned_state


def _minmax(config, wb=4, ab=8, n=6):
    model = build_unet(config)
    a, k = example_inputs(model, batch=4)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(wb, ab), a, k)
    data = calibration_data(model, n=n)
    dmq_fx.calibrate(prepared, data, progress=False)
    return model, prepared, data


def _held_out_sqnr(gm, model) -> float:
    a, k = example_inputs(model, batch=8, seed=7)
    with torch.no_grad():
        with quantizer_mode(gm, "float"):
            ref = gm(*a, **k).sample
        return sqnr_db(ref, gm(*a, **k).sample)


def test_float_parameters_are_the_layer_biases_and_norm_affines():
    model, prepared, _ = _minmax(TINY_DDPM)
    expected_bias = {
        f"{name}.bias"
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None
    }
    expected_norm = {
        f"{name}.{attr}"
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None
        for attr in ("weight", "bias")
    }
    assert set(float_parameters(prepared, ("bias",))) == expected_bias
    assert set(float_parameters(prepared, ("norm",))) == expected_norm
    both = float_parameters(prepared, ("bias", "norm"))
    assert set(both) == expected_bias | expected_norm
    assert all(both[name] is prepared.get_parameter(name) for name in both)


def test_tuning_lowers_the_output_error_and_changes_only_the_float_parameters():
    torch.manual_seed(0)
    # 4-bit activations: an error the float parameters can partly absorb (at W4A8 a random tiny
    # UNet's error is nearly all rounding noise: +0.3 dB)
    model, prepared, data = _minmax(TINY_DDPM, wb=4, ab=4)
    snapshot = state_snapshot(model)
    quantizers = learned_state(prepared)
    params = {k: v.detach().clone() for k, v in prepared.named_parameters()}
    before = _held_out_sqnr(prepared, model)
    stage = TuneFloatParameters(iterations=60, lr=1e-2, seed=1)
    stage(prepared, CalibrationContext(data, progress=False))
    after = _held_out_sqnr(prepared, model)
    # on samples it did not see, the quantized graph comes closer to the float model (8.9 to
    # 10.3 dB here)
    assert after > before + 0.7, (before, after)
    tuned = float_parameters(prepared, stage.parameters)
    assert graph_state(prepared).tuned_parameters == sorted(tuned)
    for name, p in prepared.named_parameters():
        if name not in tuned:
            assert torch.equal(p, params[name]), name
    moved = sum(not torch.equal(prepared.get_parameter(n), params[n]) for n in tuned)
    assert moved > len(tuned) // 2
    # the quantizers' state is as calibration left it; the tuned parameters join it
    state = learned_state(prepared)
    assert set(state) == set(quantizers) | set(tuned)
    assert all(torch.equal(state[k], v) for k, v in quantizers.items())
    assert_unchanged(model, snapshot)


def test_tuning_is_deterministic_and_survives_save_load_and_convert(tmp_path):
    runs = []
    for _ in range(2):
        model, prepared, data = _minmax(TINY_SD)
        dmq_fx.calibrate(
            prepared, data, [TuneFloatParameters(iterations=6, lr=1e-2, seed=2)], progress=False
        )
        runs.append(prepared)
    a, b = runs
    assert graph_state(a).stages_run[-1] == "tune_float_params"
    tuned = graph_state(a).tuned_parameters
    assert tuned and all(torch.equal(a.get_parameter(n), b.get_parameter(n)) for n in tuned)
    lowered = dmq_fx.convert_fx(a, "x86")
    dmq_fx.save(a, tmp_path / "calibrated.safetensors")
    dmq_fx.save(lowered, tmp_path / "q.safetensors")
    dmq_fx.save(lowered, tmp_path / "standalone.safetensors", standalone=True)
    args, kwargs = example_inputs(model, batch=3, seed=11)
    with torch.no_grad():
        expected = lowered(*args, **kwargs).sample
        calibrated = dmq_fx.load(tmp_path / "calibrated.safetensors", model)
        # the file holds the tuned values, which the float model does not have
        assert graph_state(calibrated).tuned_parameters == tuned
        assert all(torch.equal(calibrated.get_parameter(n), a.get_parameter(n)) for n in tuned)
        assert torch.equal(calibrated(*args, **kwargs).sample, a(*args, **kwargs).sample)
        loaded = dmq_fx.load(tmp_path / "q.safetensors", model)
        assert torch.equal(loaded(*args, **kwargs).sample, expected)
        standalone = dmq_fx.load(tmp_path / "standalone.safetensors")
        assert torch.equal(standalone(*args, **kwargs).sample, expected)


def test_an_interrupted_tuning_leaves_the_parameters_as_they_were(monkeypatch):
    _, prepared, data = _minmax(TINY_DDPM)
    params = {k: v.detach().clone() for k, v in prepared.named_parameters()}
    flags = {k: v.requires_grad for k, v in prepared.named_parameters()}
    calls = []

    def failing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    original = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        TuneFloatParameters(iterations=10, lr=1e-1)(
            prepared, CalibrationContext(data, progress=False)
        )
    assert len(calls) == 3  # two steps were taken, then undone
    assert all(torch.equal(p, params[k]) for k, p in prepared.named_parameters())
    assert {k: v.requires_grad for k, v in prepared.named_parameters()} == flags
    assert graph_state(prepared).tuned_parameters == []


def _guidance_pairs(model, n, seed, batch=4):
    """Batches laid out as a pipeline's classifier-free guidance call: the unconditional rows
    (an empty context), then the same samples with their prompts."""
    out = []
    for s in range(n):
        (x, t), kwargs = example_inputs(model, batch=batch, seed=seed + s)
        ctx = kwargs["encoder_hidden_states"]
        context = torch.cat([torch.zeros_like(ctx), ctx])
        out.append(((torch.cat([x, x]), torch.cat([t, t])), {"encoder_hidden_states": context}))
    return out


def _guided_sqnr(gm, batch, scale) -> float:
    args, kwargs = batch
    with torch.no_grad():
        with quantizer_mode(gm, "float"):
            u, c = gm(*args, **kwargs).sample.chunk(2)
        qu, qc = gm(*args, **kwargs).sample.chunk(2)
    return sqnr_db(u + scale * (c - u), qu + scale * (qc - qu))


def test_guided_tuning_matches_the_guided_prediction():
    model = build_unet(TINY_SD)
    data = _guidance_pairs(model, 6, seed=100)
    held_out = _guidance_pairs(model, 1, seed=7, batch=8)[0]
    prepared = dmq_fx.prepare_fx(
        model, dmq_fx.get_default_qconfig_mapping(4, 4), *example_inputs(model, batch=4)
    )
    dmq_fx.calibrate(prepared, data, progress=False)
    before = _guided_sqnr(prepared, held_out, 4.0)
    after = {}
    for scale in (1.0, 4.0):
        gm = copy.deepcopy(prepared)
        stage = TuneFloatParameters(iterations=30, lr=2e-2, seed=1, guidance_scale=scale)
        stage(gm, CalibrationContext(data, progress=False))
        after[scale] = _guided_sqnr(gm, held_out, 4.0)
    # the guided prediction amplifies what the halves' errors do not share: tuning each half
    # on its own gains 1.3 dB there, tuning the guided prediction 7.4 dB (-4.3 dB before)
    assert after[4.0] > before + 4.0, (before, after)
    assert after[4.0] > after[1.0] + 3.0, (before, after)
    # row-shuffled batches are refused, naming the batch
    shuffled = [((x[1:7], t[1:7]), {"encoder_hidden_states": k["encoder_hidden_states"][1:7]})
                for (x, t), k in data]  # fmt: skip
    with pytest.raises(dmq_fx.ConfigError, match=r"batch 0's 6 rows are not"):
        TuneFloatParameters(guidance_scale=4.0)(prepared, CalibrationContext(shuffled))


def test_bad_settings_and_missing_qparams_are_refused():
    with pytest.raises(dmq_fx.ConfigError, match=r"tune_float_params: parameters must be"):
        TuneFloatParameters(parameters=("bias", "conv"))
    with pytest.raises(dmq_fx.ConfigError, match=r"parameters must be"):
        TuneFloatParameters(parameters=())
    with pytest.raises(dmq_fx.ConfigError, match=r"loss must be one of \('log', 'mse'\)"):
        TuneFloatParameters(loss="l1")
    with pytest.raises(dmq_fx.ConfigError, match="iterations must be >= 0"):
        TuneFloatParameters(iterations=-1)
    with pytest.raises(dmq_fx.ConfigError, match="lr must be > 0"):
        TuneFloatParameters(lr=0)
    with pytest.raises(dmq_fx.ConfigError, match=r"guidance_scale must be >= 1 \(1: no"):
        TuneFloatParameters(guidance_scale=0.5)
    assert_needs_observed_qparams("tune_float_params")
