import pytest
import torch
from conftest import LOWERED_MIN_SQNR_DB, assert_needs_observed_qparams, calibration_data
from dmq_fx.observers import PowerOfTwoFakeQuantize, TimestepTableFakeQuantize
from dmq_fx.passes import input_quantizer_name, weight_quantizer
from test_adaround import _observed

import dmq_fx
from dmq_fx.graph.meta import graph_state, quantized_layer_nodes
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.graph.units import capture_unit_inputs, reconstruction_units, unit_graph
from dmq_fx.methods.fbr import FBR, LearnedStepFakeQuantize, fbr_loss, mix_inputs
from dmq_fx.methods.timestep_weighting import calibration_timesteps
from dmq_fx.metrics import sqnr_db
from dmq_fx.quantize.annotate import make_fake_quantize
from dmq_fx.quantize.modes import input_quantizers, weight_quantizers
from dmq_fx.quantize.stage import CalibrationContext


def test_fbr_loss_by_hand():
    out = torch.tensor([[[1.0], [2.0]], [[0.0], [0.0]]])  # (batch 2, channels 2, 1)
    target = torch.zeros(2, 2, 1)
    layer = torch.tensor([[3.0, 4.0]])  # (batch 1, features 2)
    # output: per sample sum over channels (1 + 4, 0), mean 2.5; layer: 9 + 16 = 25
    assert fbr_loss([out], [target]).item() == pytest.approx(2.5)
    got = fbr_loss([out], [target], [layer], [torch.zeros(1, 2)], layer_weight=0.8)
    assert got.item() == pytest.approx(2.5 + 0.8 * 25)
    two = fbr_loss([out, out], [target, target], [layer, layer], [layer * 0, layer * 0], 0.5)
    assert two.item() == pytest.approx(5 + 0.5 * 50)


def test_qdrop_mixing_takes_each_element_from_one_side():
    fp, q = torch.zeros(64, 8), torch.ones(64, 8)
    t = torch.arange(64)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(mix_inputs([fp, t], [q, t], 1.0, g)[0], fp)
    assert torch.equal(mix_inputs([fp, t], [q, t], 0.0, g)[0], q)
    mixed, ints = mix_inputs([fp, t], [q, t * 0], 0.5, g)
    assert ints is t  # non-float inputs come from the float side
    assert set(mixed.unique().tolist()) == {0.0, 1.0}
    assert 0.4 < mixed.mean().item() < 0.6
    again = mix_inputs([fp, t], [q, t], 0.5, torch.Generator().manual_seed(0))[0]
    first = mix_inputs([fp, t], [q, t], 0.5, torch.Generator().manual_seed(0))[0]
    assert torch.equal(again, first)


def test_learned_step_stand_in_quantizes_as_the_quantizer_it_replaces():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5) * 3
    plain = make_fake_quantize(dmq_fx.get_default_qconfig(4, 6).activation)
    pts = PowerOfTwoFakeQuantize(quant_min=0, quant_max=63, dtype=torch.quint8, ch_axis=1)
    for fq in (plain, pts):
        fq(x)  # observe
        fq.disable_observer()
    pts.observer.exponents = torch.tensor([3, 2, 1, 0, 3, 3])
    for fq in (plain, pts):
        fq.enable_fake_quant()
        stand_in = LearnedStepFakeQuantize(fq)
        assert torch.allclose(stand_in(x), fq(x), atol=1e-6)
        loss = (stand_in(x) - x).pow(2).sum()
        loss.backward()
        assert stand_in.step.grad is not None and stand_in.step.grad != 0
        with torch.no_grad():
            stand_in.step.mul_(1.5)
        stand_in.write_back()
        assert torch.allclose(stand_in(x), fq(x), atol=1e-6)


def _unit_error(gm, sub, x, target, unit):
    """Block output error with the unit's weights and activations quantized."""
    names = [
        input_quantizer_name(n.target, g, len(n.meta["dmq_fx"].input_groups))
        for n in unit.layers
        for g in range(len(n.meta["dmq_fx"].input_groups))
    ]
    quantizers = [gm.get_submodule(m) for m in names] + [
        fq for n in unit.layers for fq in weight_quantizer(gm.get_submodule(n.target)).fake_quants
    ]
    for q in quantizers:
        q.enable_fake_quant()
    with torch.no_grad():
        out = sub(*x)[0]
    for q in quantizers:
        q.disable_fake_quant()
    return (out - target).pow(2).mean().item()


@pytest.mark.parametrize("weighting", ["uniform", "adaptive"])
def test_fbr_lowers_the_block_output_error(weighting):
    _, gm, data = _observed(TINY_DDPM, wb=3, ab=6)
    for q in input_quantizers(gm) + weight_quantizers(gm):
        q.disable_fake_quant()
    unit = next(u for u in reconstruction_units(gm) if u.kind == "block" and len(u.layers) == 3)
    sub, inputs, _ = unit_graph(gm, unit)
    x = capture_unit_inputs(gm, inputs, data, None).values
    with torch.no_grad():
        target = sub(*x)[0]
    before = _unit_error(gm, sub, x, target, unit)
    steps = [gm.get_submodule(f"{unit.layers[0].target}_input_quant").scale.clone()]
    stage = FBR(iterations=300, step_lr=1e-3, timestep_weighting=weighting)
    timesteps = calibration_timesteps(gm, data, None) if weighting == "adaptive" else None
    stage.learn_unit(gm, unit, data, seed=0, timesteps=timesteps)
    for q in input_quantizers(gm) + weight_quantizers(gm):
        q.disable_fake_quant()
    after = _unit_error(gm, sub, x, target, unit)
    assert after < 0.8 * before
    learned = gm.get_submodule(f"{unit.layers[0].target}_input_quant").scale
    assert not torch.equal(learned, steps[0])  # the activation step moved
    for n in unit.layers:
        grouped = weight_quantizer(gm.get_submodule(n.target))
        assert set(grouped.rounding(0).unique().tolist()) <= {0, 1}
        assert "adaround" in n.meta["dmq_fx"].rewrites


# TINY_DDPM with every preset: test_every_preset_lowers_within_the_documented_bound
@pytest.mark.parametrize("config,preset", [(TINY_SD, "eda-dm")], ids=["sd-eda"])
def test_presets_convert_to_a_graph_that_agrees_with_the_simulation(config, preset):
    model = build_unet(config)
    a, k = example_inputs(model, batch=4)
    mapping = dmq_fx.get_default_qconfig_mapping(4, 8)
    prepared = dmq_fx.prepare_fx(model, mapping, a, k, **dmq_fx.PREPARE_FLAGS[preset])
    fast = {
        "learn_les": dmq_fx.LearnLES(iterations=3, max_samples=8),
        "fbr": FBR(iterations=3, max_samples=8, step_lr=1e-2),
    }
    stages = [fast.get(s, s) for s in dmq_fx.PRESETS[preset]]
    dmq_fx.calibrate(prepared, calibration_data(model), stages, progress=False)
    assert "fbr" in graph_state(prepared).stages_run
    lowered = dmq_fx.convert_fx(prepared, "x86")
    x, kw = example_inputs(model, batch=3, seed=7)
    with torch.no_grad():
        fp, sim, low = (g(*x, **kw).sample for g in (model, prepared, lowered))
    # the documented end-to-end bound of the lowering (tests/test_convert.py)
    assert sqnr_db(sim, low) >= LOWERED_MIN_SQNR_DB and not torch.equal(sim, fp)
    for node in quantized_layer_nodes(prepared):
        assert "adaround" in node.meta["dmq_fx"].rewrites
        layer = lowered.get_submodule(node.target)
        n = layer.num_groups
        for g in range(n):  # the lowered layer quantizes with the learned step
            fq = prepared.get_submodule(input_quantizer_name(node.target, g, n))
            if not isinstance(fq, PowerOfTwoFakeQuantize):
                assert layer.act_qparams[g][0] == pytest.approx(float(fq.scale), rel=1e-6)


def test_fbr_is_deterministic_and_needs_observed_qparams():
    runs = []
    for _ in range(2):
        _, gm, data = _observed(TINY_DDPM)
        FBR(iterations=4, max_samples=8, seed=3, step_lr=1e-2)(
            gm, CalibrationContext(data, progress=False)
        )
        runs.append([q.scale.clone() for q in input_quantizers(gm)])
        runs[-1] += [
            weight_quantizer(gm.get_submodule(n.target)).rounding(0)
            for n in quantized_layer_nodes(gm)
        ]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert_needs_observed_qparams("fbr")
    with pytest.raises(dmq_fx.ConfigError, match="fp_share"):
        FBR(fp_share=1.5)


def test_every_preset_names_registered_stages_and_its_prepare_flags():
    assert set(dmq_fx.PREPARE_FLAGS) == set(dmq_fx.PRESETS)
    for name, stages in dmq_fx.PRESETS.items():
        assert all(s in dmq_fx.STAGES for s in stages), name
    assert dmq_fx.PRESETS["eda-dm"][-1] == "fbr" and dmq_fx.PREPARE_FLAGS["eda-dm"] == {}
    assert dmq_fx.PREPARE_FLAGS["dmq+eda"] == {"les": True, "pts": "skip"}
    # dmq+eda's FBR runs longer than eda-dm's (its LES dominates the calibration time)
    assert dmq_fx.STAGES[dmq_fx.PRESETS["dmq+eda"][-2]] == FBR.long()
    # then its float parameters are tuned to the output (the paper variants keep the papers'
    # recipes)
    assert dmq_fx.PRESETS["dmq+eda"][-1] == "tune_float_params"
    assert "tune_float_params" not in dmq_fx.PRESETS["dmq+eda-paper"]
    assert FBR.long().iterations > dmq_fx.STAGES[dmq_fx.PRESETS["eda-dm"][-1]].iterations


FAST_STAGES = {
    "learn_les": dmq_fx.LearnLES(iterations=2, max_samples=8),
    "learn_les_paper": dmq_fx.LearnLES(iterations=2, max_samples=8),
    "adaround": dmq_fx.AdaRound(iterations=2, max_samples=8),
    "adaround_paper": dmq_fx.AdaRound(iterations=2, max_samples=8),
    "fbr": FBR(iterations=2, max_samples=8),
    "fbr_800": FBR(iterations=2, max_samples=8),
    "fbr_paper": FBR(iterations=2, max_samples=8),
    "tune_float_params": dmq_fx.TuneFloatParameters(iterations=2),
}
DISTINCT = sorted(p for p in dmq_fx.PRESETS if not p.endswith("-paper"))


@pytest.mark.parametrize("preset", DISTINCT)
def test_every_preset_lowers_within_the_documented_bound(preset):
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model, batch=4)
    mapping = dmq_fx.get_default_qconfig_mapping(4, 8)
    prepared = dmq_fx.prepare_fx(model, mapping, a, k, **dmq_fx.PREPARE_FLAGS[preset])
    stages = [FAST_STAGES.get(s, s) for s in dmq_fx.PRESETS[preset]]
    dmq_fx.calibrate(prepared, calibration_data(model), stages, progress=False)
    lowered = dmq_fx.convert_fx(prepared, "x86")
    x, kw = example_inputs(model, batch=2, seed=3)
    with torch.no_grad():
        fp, sim, low = (g(*x, **kw).sample for g in (model, prepared, lowered))
    assert sqnr_db(sim, low) >= LOWERED_MIN_SQNR_DB and not torch.equal(sim, fp)
    # summary() lists the stages the preset ran
    assert dmq_fx.summary(lowered).header["stages"].count(">") == len(stages) - 1


def test_fbr_with_timestep_tables_learns_rounding_and_keeps_the_tables():
    # the table quantizers are called with the timestep as well: the learning loop's
    # fixed-mode stand-ins pass it on
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model, batch=4)
    prepared = dmq_fx.prepare_fx(
        model, dmq_fx.get_default_qconfig_mapping(4, 8), a, k, timestep_tables=True
    )
    data = calibration_data(model)
    dmq_fx.calibrate(prepared, data, ["observe_activations", "observe_weights"], progress=False)
    tables = {
        name: {key: v.clone() for key, v in m.state_dict().items()}
        for name, m in prepared.named_modules()
        if isinstance(m, TimestepTableFakeQuantize)
    }
    assert tables
    dmq_fx.calibrate(prepared, data, [FBR(iterations=4, max_samples=8)], progress=False)
    for name, state in tables.items():
        now = prepared.get_submodule(name).state_dict()
        assert all(torch.equal(now[key], v) for key, v in state.items()), name
    assert all(n.meta["dmq_fx"].adaround for n in quantized_layer_nodes(prepared))
