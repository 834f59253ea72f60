import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dmq_fx
from dmq_fx.errors import ConfigError
from dmq_fx.graph.unet_configs import TINY_DDPM, build_unet, example_inputs
from dmq_fx.methods.adaround import AdaRound, output_loss, sample_losses
from dmq_fx.methods.fbr import FBR, fbr_loss
from dmq_fx.methods.timestep_weighting import (
    AdaptiveTimestepWeighting,
    adaptive_timestep_weights,
    batch_timesteps,
    calibration_timesteps,
)


def test_adaptive_timestep_weights_hand_values():
    shares = torch.tensor([0.02, 0.05, 0.10, 0.20, 0.63], dtype=torch.float64)
    weights = adaptive_timestep_weights(3.0 * shares, r=20)  # only the shares matter
    assert weights[:4].tolist() == pytest.approx([0.668, 0.358, 0.122, 0.0115], abs=6e-4)
    assert torch.equal(adaptive_timestep_weights(torch.zeros(4)), torch.ones(4))


def test_running_losses_and_weights_by_hand():
    weighting = AdaptiveTimestepWeighting(torch.tensor([10, 10, 20, 20, 30]), r=20, momentum=0.95)
    # samples 0 (t=10, loss 1), 2 and 3 (t=20, losses 2 and 6): Lambda = 0.05 * [1, 8, 0]
    w = weighting.weights(torch.tensor([0, 2, 3]), torch.tensor([1.0, 2.0, 6.0]))
    assert weighting.running.tolist() == pytest.approx([0.05, 0.4, 0.0])
    assert w.tolist() == pytest.approx([(8 / 9) ** 20, (1 / 9) ** 20, (1 / 9) ** 20])
    # a batch of t=30 only: the other steps keep their running loss
    w = weighting.weights(torch.tensor([4]), torch.tensor([3.0]))
    assert weighting.running.tolist() == pytest.approx([0.05, 0.4, 0.15])
    assert w.tolist() == pytest.approx([0.75**20])


def test_one_timestep_weighs_every_sample_the_same():
    weighting = AdaptiveTimestepWeighting(torch.full((6,), 500))
    assert not weighting.active
    assert torch.equal(
        weighting.weights(torch.arange(3), torch.tensor([1.0, 9.0, 4.0])), torch.ones(3)
    )


def test_batch_timesteps_from_args_kwargs_and_scalars():
    gm = dmq_fx.trace(build_unet(TINY_DDPM), *example_inputs(build_unet(TINY_DDPM), batch=2))
    x = torch.randn(3, 3, 8, 8)
    assert batch_timesteps(gm, (x, torch.tensor([1, 2, 3])), {}).tolist() == [1, 2, 3]
    assert batch_timesteps(gm, (x,), {"timestep": 7}).tolist() == [7, 7, 7]
    assert batch_timesteps(gm, (x, torch.tensor(5)), {}).tolist() == [5, 5, 5]


def test_calibration_timesteps_follow_the_samples_and_their_cut():
    gm = dmq_fx.trace(build_unet(TINY_DDPM), *example_inputs(build_unet(TINY_DDPM), batch=2))
    x = torch.randn(3, 3, 8, 8)
    batches = [((x, torch.tensor([1, 2, 3])), {}), ((x,), {"timestep": 9})]
    assert calibration_timesteps(gm, batches, None).tolist() == [1, 2, 3, 9, 9, 9]
    assert calibration_timesteps(gm, batches, 4).tolist() == [1, 2, 3, 9]


@given(st.integers(1, 5), st.integers(1, 4), st.booleans())
@settings(max_examples=25, deadline=None)
def test_sample_losses_average_to_the_scalar_loss(batch, channels, relative):
    g = torch.Generator().manual_seed(batch * 10 + channels)
    pred, target = torch.randn(2, batch, channels, 3, 3, generator=g)
    per_sample = sample_losses(pred, target, relative)
    assert per_sample.shape == (batch,)
    assert per_sample.mean().item() == pytest.approx(output_loss(pred, target, relative).item())
    layer = torch.randn(batch, 5, generator=g)
    vector = fbr_loss([pred], [target], [layer], [layer * 0], 0.8, relative, per_sample=True)
    scalar = fbr_loss([pred], [target], [layer], [layer * 0], 0.8, relative)
    assert vector.mean().item() == pytest.approx(scalar.item())


@pytest.mark.parametrize("stage", [AdaRound, FBR])
def test_bad_timestep_weighting_names_the_stage(stage):
    with pytest.raises(ConfigError, match=rf"{stage.name}: timestep_weighting must be one of"):
        stage(timestep_weighting="linear")


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_adaptive_weighting_without_timesteps_is_refused():
    model = _Conv()
    data = [((torch.randn(4, 4, 6, 6),), {}) for _ in range(2)]
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(4, 8), *data[0])
    dmq_fx.calibrate(prepared, data, progress=False)
    stage = AdaRound(iterations=2, timestep_weighting="adaptive")
    with pytest.raises(ConfigError, match="adaround: timestep_weighting='adaptive' needs"):
        dmq_fx.calibrate(prepared, data, [stage], progress=False)
