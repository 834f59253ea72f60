"""capture="cursor": LES and AdaRound learn the same state as with capture="restart", running
the forward about once per batch instead of once per unit."""

import pytest
import torch
from conftest import calibration_data

import dmq_fx
from dmq_fx.errors import ConfigError
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.methods.adaround import AdaRound
from dmq_fx.methods.fbr import FBR
from dmq_fx.methods.les import LearnLES, les_units
from dmq_fx.quantize.state import learned_state


def _calibrate(model, capture: str, data, calls: dict):
    a, k = example_inputs(model, batch=4)
    mapping = dmq_fx.get_default_qconfig_mapping(4, 8)
    gm = dmq_fx.prepare_fx(model, mapping, a, k, les=True, pts="skip")

    def count(stage_name):
        def hook(module, inputs):
            calls[stage_name] = calls.get(stage_name, 0) + 1

        return hook

    conv_in = gm.get_submodule("conv_in")
    for name, stage in [
        ("learn_les", [LearnLES(iterations=3, capture=capture)]),
        ("observe", ["observe_activations", "vote_pts", "observe_weights"]),
        ("adaround", [AdaRound(iterations=3, capture=capture)]),
    ]:
        handle = conv_in.register_forward_pre_hook(count(name))
        dmq_fx.calibrate(gm, data, stage, progress=False)
        handle.remove()
    return gm


@pytest.mark.parametrize("config", [TINY_DDPM, TINY_SD], ids=["ddpm", "sd"])
def test_cursor_learns_bit_identical_state_with_one_forward_per_batch(config):
    model = build_unet(config)
    data = calibration_data(model, n=2)
    restart_calls, cursor_calls = {}, {}
    restart = _calibrate(model, "restart", data, restart_calls)
    cursor = _calibrate(model, "cursor", data, cursor_calls)
    expected, got = learned_state(restart), learned_state(cursor)
    assert expected.keys() == got.keys()
    differing = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differing, differing[:5]
    # every LES unit captured its inputs from the paused forwards (a unit that fell back to a
    # partial forward would reach conv_in once more per batch); restart reaches it once per
    # unit and batch (conv_in's own capture stops at its input)
    assert cursor_calls["learn_les"] == len(data)
    assert restart_calls["learn_les"] == len(les_units(restart)) * len(data)
    assert cursor_calls["adaround"] == len(data) < restart_calls["adaround"]


def test_capture_mode_is_checked():
    with pytest.raises(ConfigError, match="capture"):
        LearnLES(capture="sometimes")
    with pytest.raises(ConfigError, match="adaround: capture"):
        AdaRound(capture="rewind")
    with pytest.raises(ConfigError, match="fbr: capture must be 'restart'"):
        FBR(capture="cursor")
