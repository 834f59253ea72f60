import pytest
import torch
from conftest import LOWERED_MIN_SQNR_DB, calibration_data
from dmq_fx.observers import PowerOfTwoFakeQuantize, PowerOfTwoVotingObserver, candidate_errors
from dmq_fx.passes import skip_concatenations, skip_connection_layers

import dmq_fx
from dmq_fx.graph.unet_configs import DDPM_CIFAR10, TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.methods.pts import pts_quantizers
from dmq_fx.metrics import sqnr_db

STEP = 0.01  # the per-tensor step of the constructed data: range [0, 2.55] at 8 bits


def _observer(**kwargs) -> PowerOfTwoVotingObserver:
    obs = PowerOfTwoVotingObserver(quant_min=0, quant_max=255, **kwargs)
    obs(torch.tensor([0.0, 255 * STEP]))  # fixes s = 0.01, z = 0
    obs.start_voting()
    return obs


def _samples(pattern: list[float], n: int) -> torch.Tensor:
    """``n`` samples of one channel of 6 values, each a multiple of ``pattern``'s step."""
    values = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 11.0])
    return torch.stack([values * pattern for _ in range(n)])[:, None, :]


FINEST = STEP / 8  # odd multiples: only candidate j = 0 (step s / 8) is exact
PLAIN = STEP  # multiples of s: every candidate is exact, a tie that goes to j = D


def test_candidate_errors_by_hand():
    x = _samples(FINEST, 1)
    err = candidate_errors(x, STEP, 0, 0, 255, 3)
    assert err.shape == (1, 1, 4)
    assert err[0, 0, 0] == pytest.approx(0, abs=1e-12)
    assert (err[0, 0, 1:] > 0).all()
    assert torch.allclose(candidate_errors(_samples(PLAIN, 1), STEP, 0, 0, 255, 3), torch.zeros(4))


def test_unanimous_votes_are_adopted():
    obs = _observer()
    obs(_samples(FINEST, 10))
    assert obs.finish_voting().tolist() == [0]
    assert obs.channel_factors(1).tolist() == [1 / 8]


def test_an_80_20_split_needs_kappa_at_most_0_8():
    for kappa, expected in ((0.85, 3), (0.8, 0)):
        obs = _observer(kappa=kappa)
        obs(torch.cat([_samples(FINEST, 8), _samples(PLAIN * 3.3, 2)]))
        assert obs.finish_voting().tolist() == [expected], kappa


def test_ties_go_to_the_coarser_step():
    obs = _observer()
    obs(_samples(PLAIN, 10))  # every candidate exact
    assert obs.finish_voting().tolist() == [3]
    obs = _observer()
    obs(_samples(STEP / 4, 10))  # j = 0 and j = 1 exact: the coarser wins
    assert obs.finish_voting().tolist() == [1]
    obs = _observer(kappa=0.5)
    obs(torch.cat([_samples(FINEST, 5), _samples(STEP / 4 * 1.0, 5)]))  # votes 5 for 0, 5 for 1
    assert obs.finish_voting().tolist() == [1]


def test_channels_vote_independently_and_mse_selection_sums_errors():
    a, b = _samples(FINEST, 10), _samples(PLAIN * 1.3, 10)
    obs = _observer()
    obs(torch.cat([a, b], dim=1))
    votes = obs.votes.clone()
    assert obs.finish_voting().tolist()[0] == 0
    assert votes.sum(1).tolist() == [10, 10]
    # mse: 8 samples slightly prefer j = 0, 2 strongly prefer j = 3; the sum decides
    obs = _observer(selection="mse")
    obs(torch.cat([_samples(FINEST, 8), _samples(0.3 * 1.0, 2)]))
    summed = obs.summed_errors[0]
    assert obs.finish_voting().tolist() == [int(torch.argmin(summed))]


def test_observer_rejects_bad_options():
    with pytest.raises(ValueError, match="selection"):
        PowerOfTwoVotingObserver(selection="median")
    with pytest.raises(ValueError, match="kappa"):
        PowerOfTwoVotingObserver(kappa=0)
    with pytest.raises(RuntimeError, match="no sample"):
        PowerOfTwoVotingObserver().finish_voting()


@pytest.mark.parametrize(
    "config,cats,shortcuts", [(TINY_DDPM, 6, 7), (TINY_SD, 4, 5), (DDPM_CIFAR10, 12, 13)]
)
def test_the_pass_finds_every_skip_concatenation(config, cats, shortcuts):
    model = build_unet(config)
    gm = dmq_fx.trace(model, *example_inputs(model))
    channel_cats = [
        n
        for n in gm.graph.nodes
        if n.target is torch.cat and (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")) == 1
    ]
    found = skip_concatenations(gm)
    assert found == channel_cats and len(found) == cats
    layers = skip_connection_layers(gm)
    assert len(layers) == shortcuts
    assert all(gm.get_submodule(n.target).kernel_size == (1, 1) for n in layers)
    for cat in found:  # norm1 and the shortcut conv
        assert len(cat.users) == 2 and any(u in layers for u in cat.users)


class _Skip(torch.nn.Module):
    """A decoder resnet's skip structure under other names: cat -> (main, 1x1 shortcut) -> add."""

    def __init__(self):
        super().__init__()
        self.main = torch.nn.Conv2d(12, 8, 3, padding=1)
        self.short = torch.nn.Conv2d(12, 8, 1)

    def forward(self, a, b):
        h = torch.cat([a, b], dim=1)
        return self.main(torch.relu(h)) + self.short(h)


def _skip_graph(wb, ab, les=False):
    torch.manual_seed(0)
    model = _Skip().eval()
    with torch.no_grad():
        model.short.weight.mul_(3)
    example = (torch.randn(2, 4, 5, 5), torch.randn(2, 8, 5, 5))
    data = []
    for i in range(6):
        g = torch.Generator().manual_seed(i)
        scale = torch.logspace(-1.5, 0.5, 12)
        x = torch.randn(8, 12, 5, 5, generator=g) * scale.view(1, -1, 1, 1)
        data.append((x[:, :4], x[:, 4:]))
    prepared = dmq_fx.prepare_fx(
        model,
        dmq_fx.get_default_qconfig_mapping(wb, ab),
        example,
        les=les,
        pts="skip",
        pts_options={"kappa": 0.6},
    )
    dmq_fx.calibrate(prepared, data, dmq_fx.PRESETS["pts"], progress=False)
    return model, prepared, data


def test_pts_shift_lowering_equals_the_simulation():
    model, prepared, data = _skip_graph(4, 6)
    exps = torch.cat([q.observer.exponents for q in pts_quantizers(prepared)])
    assert exps.min() < 3, "the constructed data should make some channels use finer steps"
    lowered = dmq_fx.convert_fx(prepared, "x86")
    row = next(r for r in dmq_fx.summary(lowered).rows if r["node"] == "short")
    assert "pts:shift" in row["dmq"] and row["form"] == "int8"
    layer = lowered.get_submodule("short")
    sim_layer = prepared.get_submodule("short")
    grouped = sim_layer.parametrizations.weight[-1]
    offset = 0
    for g, (fq, q) in enumerate(zip(grouped.fake_quants, pts_quantizers(prepared))):
        w = grouped.split(sim_layer.parametrizations.weight.original)[g]
        s = fq.scale.view(-1, 1, 1, 1)
        w_int = torch.clamp(torch.round(w / s) + fq.zero_point.view(-1, 1, 1, 1), 0, 15)
        shift = (2**q.observer.exponents).view(1, -1, 1, 1)
        expected = (w_int - fq.zero_point.view(-1, 1, 1, 1)) * shift
        assert torch.equal(getattr(layer, f"weight_int_{g}").int(), expected.int())
        offset += w.shape[1]
    x = data[0]
    with torch.no_grad():
        sim = prepared(*x)
        for backend in ("x86", "reference"):
            out = dmq_fx.convert_fx(prepared, backend)(*x)
            # exact integer arithmetic: only the float rescale of the output may differ
            assert (out - sim).abs().max() <= 1e-5 * sim.abs().max(), backend


def test_pts_with_8_bit_weights_lowers_through_dequantization():
    _, prepared, data = _skip_graph(8, 8, les=True)
    lowered = dmq_fx.convert_fx(prepared, "x86")
    row = next(r for r in dmq_fx.summary(lowered).rows if r["node"] == "short")
    assert "pts:dequant" in row["dmq"] and row["form"] == "reference"
    with torch.no_grad():
        sim, out = prepared(*data[0]), lowered(*data[0])
    assert (out - sim).abs().max() <= 1e-5 * sim.abs().max()


def test_pts_on_unets_converts_and_agrees_with_the_simulation():
    for config in (TINY_DDPM, TINY_SD):
        model = build_unet(config)
        a, k = example_inputs(model, batch=4)
        prepared = dmq_fx.prepare_fx(
            model, dmq_fx.get_default_qconfig_mapping(4, 8), a, k, pts="skip"
        )
        assert all(isinstance(q, PowerOfTwoFakeQuantize) for q in pts_quantizers(prepared))
        traced = dmq_fx.trace(model, a, k)
        cats, layers = skip_concatenations(traced), skip_connection_layers(traced)
        # split shortcut convs: one quantizer per concatenated input
        assert len(pts_quantizers(prepared)) == 2 * len(cats) + len(layers) - len(cats)
        dmq_fx.calibrate(prepared, calibration_data(model), dmq_fx.PRESETS["pts"], progress=False)
        a2, k2 = example_inputs(model, batch=3, seed=4)
        with torch.no_grad():
            fp = model(*a2, **k2).sample
            sim = prepared(*a2, **k2).sample
            assert not torch.equal(sim, fp)
            out = dmq_fx.convert_fx(prepared, "reference")(*a2, **k2).sample
        # the documented end-to-end bound (conftest): float summation order can flip single
        # integers; the exact per-layer equality is test_pts_shift_lowering_equals_the_simulation
        assert sqnr_db(sim, out) >= LOWERED_MIN_SQNR_DB


def test_pts_errors():
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model, batch=4)
    with pytest.raises(dmq_fx.ConfigError, match="pts must be"):
        dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(), a, k, pts="skips")
    with pytest.raises(dmq_fx.ConfigError, match="pts_options"):
        dmq_fx.prepare_fx(
            model, dmq_fx.get_default_qconfig_mapping(), a, k, pts="skip", pts_options={"d": 2}
        )
    plain = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(), a, k)
    with pytest.raises(dmq_fx.ConfigError, match="pts='skip'"):
        dmq_fx.calibrate(plain, calibration_data(model), ["vote_pts"], progress=False)
    with_pts = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(), a, k, pts="skip")
    with pytest.raises(dmq_fx.ConfigError, match="observe_activations"):
        dmq_fx.calibrate(with_pts, calibration_data(model), ["vote_pts"], progress=False)
