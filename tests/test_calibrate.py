import pytest
import torch
import torch.nn.functional as F
from conftest import calibration_data
from dmq_fx.passes import weight_quantizer

import dmq_fx
from dmq_fx.graph.meta import graph_state
from dmq_fx.graph.unet_configs import TINY_DDPM, build_unet, example_inputs


class TwoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_activation_ranges_are_a_095_moving_average():
    model = TwoLinear()
    x1, x2 = torch.randn(16, 8), torch.randn(16, 8) * 3
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(8, 8), (x1,))
    dmq_fx.calibrate(prepared, [(x1,), (x2,)], progress=False)
    obs = prepared.get_submodule("a_input_quant").activation_post_process
    lo1, lo2, hi1, hi2 = x1.min().item(), x2.min().item(), x1.max().item(), x2.max().item()
    assert obs.min_val.item() == pytest.approx(lo1 + 0.05 * (lo2 - lo1), rel=1e-6)
    assert obs.max_val.item() == pytest.approx(hi1 + 0.05 * (hi2 - hi1), rel=1e-6)


def test_calibrated_graph_simulates_quantization_exactly():
    model = TwoLinear()
    xs = [torch.randn(16, 8) for _ in range(3)]
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(4, 6), (xs[0],))
    dmq_fx.calibrate(prepared, [(x,) for x in xs], progress=False)

    def fq_act(x, name):
        fq = prepared.get_submodule(name)
        assert (fq.quant_min, fq.quant_max) == (0, 63)
        s, z = float(fq.scale), int(fq.zero_point)
        return (torch.clamp(torch.round(x / s) + z, 0, 63) - z) * s

    def fq_weight(layer):
        fq = weight_quantizer(prepared.get_submodule(layer)).fake_quants[0]
        s, z = fq.scale.view(-1, 1), fq.zero_point.view(-1, 1).float()
        w = model.get_submodule(layer).weight
        return (torch.clamp(torch.round(w / s) + z, 0, 15) - z) * s

    x = torch.randn(5, 8)
    h = torch.relu(F.linear(fq_act(x, "a_input_quant"), fq_weight("a"), model.a.bias))
    expected = F.linear(fq_act(h, "b_input_quant"), fq_weight("b"), model.b.bias)
    torch.testing.assert_close(prepared(x), expected, rtol=1e-5, atol=1e-6)


def test_stages_are_an_ordered_list_and_custom_stages_run():
    model = TwoLinear()
    x = torch.randn(4, 8)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(), (x,))
    calls = []

    def count_batches(gm, batches, progress):
        calls.append(len(batches))

    dmq_fx.calibrate(
        prepared,
        [(x,), ((x,), {})],
        stages=["observe_activations", count_batches, "observe_weights"],
        progress=False,
    )
    assert calls == [2]
    assert graph_state(prepared).stages_run == [
        "observe_activations",
        "count_batches",
        "observe_weights",
    ]
    assert "observe_activations > count_batches > observe_weights" in str(dmq_fx.summary(prepared))
    dmq_fx.calibrate(prepared, [(x,)], stages=[count_batches], progress=False)
    assert calls == [2, 1]  # a second call continues the calibrated graph
    assert graph_state(prepared).stages_run[-2:] == ["observe_weights", "count_batches"]


def test_bad_calibration_input_is_named():
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(), a, k)
    with pytest.raises(dmq_fx.CalibrationError, match="no calibration batches"):
        dmq_fx.calibrate(prepared, [], progress=False)
    bad = calibration_data(model, n=2)
    bad[1][0][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(dmq_fx.CalibrationError, match="batch 1: input 0 contains NaN"):
        dmq_fx.calibrate(prepared, bad, progress=False)
    with pytest.raises(dmq_fx.ConfigError, match="unknown calibration stage 'les'"):
        dmq_fx.calibrate(prepared, calibration_data(model, n=1), stages=["les"], progress=False)
    with pytest.raises(dmq_fx.CalibrationError, match="expects the graph returned by"):
        dmq_fx.calibrate(model, calibration_data(model, n=1), progress=False)
    with pytest.raises(dmq_fx.InputMismatchError, match="traced for shape"):
        dmq_fx.calibrate(prepared, [((torch.randn(2, 3, 8, 8), 1), {})], progress=False)
