import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import dmq_fx
from dmq_fx.graph.unet_configs import (
    TINY_CLASS_CONDITIONAL,
    TINY_DDPM,
    TINY_SD,
    build_unet,
    example_inputs,
)

# Under pytest-xdist (README's `-n 2`) each worker gets one of the 2 cores: the tiny models'
# ops gain little from a second thread, and two threads per worker would oversubscribe.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# Hypothesis: CI draws the same examples every run (derandomized, no example database);
# HYPOTHESIS_PROFILE=long draws many more, randomly, for a local search.
settings.register_profile(
    "ci",
    max_examples=8,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TINY_CONFIGS = {"ddpm": TINY_DDPM, "class_cond": TINY_CLASS_CONDITIONAL, "sd": TINY_SD}


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_unet(request):
    return build_unet(TINY_CONFIGS[request.param])


#: End to end, a lowered graph agrees with its simulation (and x86 with reference) to at least
#: this SQNR in dB. Per layer they agree within 1% of an output step on identical inputs
#: (test_layer_exactness, test_convert); end to end, float rounding flips a rare integer at a
#: .5 tie and random-weight UNets amplify it downstream (benchmarks/lowering_agreement.py prints
#: the figures), so the bound is absolute rather than a share of the quantization error, which
#: at W8A8 is itself only about 30 dB on these UNets.
LOWERED_MIN_SQNR_DB = 25.0


#: the learned stages at a test budget (lowering and exactness do not depend on how long they
#: learned)
CHEAP_STAGES = {
    "learn_les": dmq_fx.LearnLES(iterations=8, max_samples=8),
    "adaround": dmq_fx.AdaRound(iterations=8, max_samples=8),
    "fbr": dmq_fx.FBR(iterations=8, max_samples=8),
    "fbr_800": dmq_fx.FBR(iterations=8, max_samples=8),
    "tune_float_params": dmq_fx.TuneFloatParameters(iterations=4),
}


def cheap_stages(preset: str) -> list:
    """``preset``'s stages with the learned ones at the test budget."""
    return [CHEAP_STAGES.get(name, name) for name in dmq_fx.PRESETS[preset].stages]


def calibration_data(model, n=3, batch=4):
    return [example_inputs(model, batch=batch, seed=100 + s) for s in range(n)]


def prepared_and_calibrated(model, weight_bits=8, act_bits=8, **kwargs):
    args, kw = example_inputs(model, batch=4)
    prepared = dmq_fx.prepare_fx(
        model, dmq_fx.get_default_qconfig_mapping(weight_bits, act_bits), args, kw, **kwargs
    )
    return dmq_fx.calibrate(prepared, calibration_data(model), progress=False)


def state_snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        model.training,
        dict(model.named_modules()).keys(),
    )


def assert_unchanged(model, snapshot):
    state, training, names = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert model.training == training
    assert dict(model.named_modules()).keys() == names


def assert_needs_observed_qparams(stage: str) -> None:
    """``stage`` refuses a graph whose weight qparams, then activation ranges, are not observed,
    naming the stage and the missing one."""
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model, batch=4)
    fresh = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(4, 8), a, k)
    data = calibration_data(model)
    with pytest.raises(dmq_fx.ConfigError, match=f"{stage} .*observe_weights"):
        dmq_fx.calibrate(fresh, data, [stage], progress=False)
    with pytest.raises(dmq_fx.ConfigError, match=f"{stage} .*observe_activations"):
        dmq_fx.calibrate(fresh, data, ["observe_weights", stage], progress=False)
