import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from dmq_fx_bench.datasets import load_fashion_mnist
from dmq_fx_bench.evaluation import (
    EfficientNetLite0Features,
    EpsSQNRProbe,
    frechet_distance,
    psnr_db,
    sqnr_db,
)
from dmq_fx_bench.reference_models import sample_ddim


class _Flatten(torch.nn.Module):
    num_features = 4

    def forward(self, x):
        return x.flatten(1).float()


def test_frechet_distance_of_gaussians_matches_closed_form():
    """Identity features: FD(N(0, I), N(mu, I)) = |mu|^2 (the covariance terms cancel)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 1, 2, 2, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 1, 2, 2, generator=g, dtype=torch.float64) + 0.5
    fd = frechet_distance(a, b, _Flatten(), batch_size=5000)
    assert fd == pytest.approx(4 * 0.25, abs=0.03)
    # a covariance difference adds tr(S1 + S2 - 2 sqrt(S1 S2)) = 4 (1 + 4 - 2 * 2) = 4
    fd_scaled = frechet_distance(a, 2 * a, _Flatten(), batch_size=5000)
    assert fd_scaled == pytest.approx(4.0, rel=0.03)


@pytest.fixture(scope="module")
def fashion_test_images():
    images, _ = load_fashion_mnist("test")
    x = torch.from_numpy(images[:200]).float().div(127.5).sub(1).unsqueeze(1)
    return x


def test_efficientnet_frechet_distance_self_zero_shifted_larger(fashion_test_images):
    features = EfficientNetLite0Features()
    real = fashion_test_images
    same = frechet_distance(real, real, features)
    shifted = [frechet_distance(real, (real + d).clamp(-1, 1), features) for d in (0.2, 0.5)]
    noisy = [
        frechet_distance(real, (real + s * torch.randn_like(real)).clamp(-1, 1), features)
        for s in (0.1, 0.3)
    ]
    assert abs(same) < 1e-2
    assert 1.0 < shifted[0] < shifted[1]
    assert 1.0 < noisy[0] < noisy[1]
    # two halves of the real set are closer than the real set and pure noise
    half = frechet_distance(real[:100], real[100:], features)
    assert half < 0.5 * frechet_distance(real[:100], torch.rand_like(real[100:]) * 2 - 1, features)


def test_sqnr_and_psnr_known_values():
    assert sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 5.0])) == pytest.approx(
        10 * math.log10(25)
    )
    assert sqnr_db(torch.ones(3), torch.ones(3)) == math.inf
    ref = torch.zeros(2, 1, 4, 4)
    assert psnr_db(ref, ref + 0.2) == pytest.approx(20.0)
    # mean of per-sample values, not the pooled MSE
    test = torch.cat([ref[:1] + 0.2, ref[:1] + 0.02])
    assert psnr_db(ref, test) == pytest.approx(30.0)


class _ToyUNet(torch.nn.Module):
    config = SimpleNamespace(sample_size=4, in_channels=1)

    def __init__(self, gain: float = 1.0):
        super().__init__()
        self.gain = gain

    def forward(self, x, t):
        return SimpleNamespace(sample=self.gain * (0.5 * x + t.float() / 1000))


def test_eps_sqnr_probe_per_step_and_mean():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    fp, scaled = _ToyUNet(), _ToyUNet(gain=1.1)
    probe = EpsSQNRProbe(lambda x, t: scaled(x, t).sample)
    sample_ddim(fp, scheduler, 8, steps=5, on_step=probe)
    per_step = probe.per_step_db()
    assert len(per_step) == 5
    # test = 1.1 * eps: noise is 1% of the signal energy at every step -> 20 dB
    assert per_step == pytest.approx([20.0] * 5, abs=1e-4)
    assert probe.mean_db == pytest.approx(20.0, abs=1e-4)
