import pytest
import torch
from dmq_fx.observers import MSEGridSearchPerChannelObserver
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.ao.quantization.observer import MovingAverageMinMaxObserver

import dmq_fx
from dmq_fx.quantize.qconfig import activation_observer, weight_observer


def lp_error(w, scale, zp, qmin, qmax, p=2.4):
    wq = torch.fake_quantize_per_channel_affine(w, scale.float(), zp.int(), 0, qmin, qmax)
    return (wq - w).abs().pow(p).reshape(w.shape[0], -1).mean(1)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([3, 4, 6]), outlier=st.floats(1, 30))
def test_mse_observer_is_the_best_candidate_of_the_grid(seed, bits, outlier):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 20, generator=g)
    w[0, 0] = outlier
    qmax = 2**bits - 1
    obs = MSEGridSearchPerChannelObserver(
        dtype=torch.quint8,
        qscheme=torch.per_channel_affine,
        quant_min=0,
        quant_max=qmax,
        ch_axis=0,
    )
    obs(w)
    scale, zp = obs.calculate_qparams()
    got = lp_error(w, scale, zp, 0, qmax)
    # brute force over the same grid, computed independently per channel
    for c in range(w.shape[0]):
        best = float("inf")
        for i in range(80):
            lo = min(w[c].min().item() * (1 - 0.01 * i), 0.0)
            hi = max(w[c].max().item() * (1 - 0.01 * i), 0.0)
            s = max((hi - lo) / qmax, torch.finfo(torch.float32).eps)
            z = min(max(round(-lo / s), 0), qmax)
            e = lp_error(w[c : c + 1], torch.tensor([s]), torch.tensor([z]), 0, qmax).item()
            best = min(best, e)
        assert got[c].item() <= best * (1 + 1e-4) + 1e-9
    # and never worse than plain min/max (candidate 0)
    mm_scale, mm_zp = obs._calculate_qparams(obs.min_val, obs.max_val)
    assert (got <= lp_error(w, mm_scale, mm_zp, 0, qmax) + 1e-9).all()


@pytest.mark.parametrize(
    "shape, ch_axis", [((24, 2**17), 0), ((7, 5, 3), 1)], ids=["several-blocks", "ch-axis-1"]
)
def test_mse_observer_matches_a_whole_tensor_search_with_the_aten_kernel(shape, ch_axis):
    """The blocked search with hand-written fake quantization picks exactly what a whole-tensor
    search with torch.fake_quantize_per_channel_affine picks (24 rows of 2^17 span 3 blocks)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g) * torch.rand(shape[ch_axis], generator=g).view(
        [-1 if i == ch_axis else 1 for i in range(len(shape))]
    )
    obs = MSEGridSearchPerChannelObserver(
        dtype=torch.qint8,
        qscheme=torch.per_channel_affine,
        quant_min=-8,
        quant_max=7,
        ch_axis=ch_axis,
    )
    obs(w)
    scale, zp = obs.calculate_qparams()
    rows = w.transpose(0, ch_axis)
    best_err = best_s = best_z = None
    for i in range(80):
        s, z = obs._calculate_qparams(obs.min_val * (1 - 0.01 * i), obs.max_val * (1 - 0.01 * i))
        err = lp_error(rows, s, z, -8, 7)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    assert torch.equal(scale, best_s)
    assert torch.equal(zp, best_z)


def test_default_observers_follow_spec_1_1():
    w4 = weight_observer(4)()
    assert (w4.quant_min, w4.quant_max, w4.qscheme) == (0, 15, torch.per_channel_affine)
    assert (w4.p, w4.num_candidates) == (2.4, 80)
    w8 = weight_observer(8)()
    assert (w8.quant_min, w8.quant_max, w8.qscheme) == (-128, 127, torch.per_channel_symmetric)
    a6 = activation_observer(6)()
    assert isinstance(a6, MovingAverageMinMaxObserver)
    assert (a6.quant_min, a6.quant_max, a6.qscheme) == (0, 63, torch.per_tensor_affine)
    assert a6.averaging_constant == pytest.approx(0.05)  # momentum 0.95


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.5, True, "8"])
def test_unsupported_bit_widths_are_rejected(bits):
    with pytest.raises(dmq_fx.ConfigError, match="weight_bits must be an integer from 2 to 8"):
        dmq_fx.get_default_qconfig_mapping(weight_bits=bits)
    with pytest.raises(dmq_fx.ConfigError, match="act_bits must be an integer from 2 to 8"):
        dmq_fx.get_default_qconfig_mapping(act_bits=bits)


def test_mse_observer_releases_the_weight_and_keeps_its_answer():
    obs = MSEGridSearchPerChannelObserver(
        dtype=torch.qint8, qscheme=torch.per_channel_affine, quant_min=-8, quant_max=7
    )
    w = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    obs(w * 1.0)
    first = obs.calculate_qparams()
    assert obs._observed is None  # no copy of the weight outlives the search
    again = obs.calculate_qparams()
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], obs._calculate_qparams(obs.min_val, obs.max_val)[0])
    obs(w * 3.0)  # a new observation is searched anew
    assert torch.allclose(obs.calculate_qparams()[0], first[0] * 3.0, rtol=1e-5)
