import pytest
import torch
from conftest import LOWERED_MIN_SQNR_DB
from dmq_fx.observers import TimestepTableFakeQuantize, nearest_grid_index
from torch.ao.quantization.fake_quantize import FakeQuantize
from torch.ao.quantization.observer import MinMaxObserver

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_DDPM, build_unet, example_inputs
from dmq_fx.metrics import sqnr_db
from dmq_fx.quantize.modes import input_quantizers

GRID = [100, 500, 900]


def test_nearest_grid_index_by_hand():
    grid = torch.tensor(GRID, dtype=torch.float64)
    t = torch.tensor([100, 299, 300, 301, 699, 700, 900])
    assert nearest_grid_index(grid, t).tolist() == [0, 0, 0, 1, 1, 1, 2]  # ties: the lower
    for outside in (50, 950):
        with pytest.raises(dmq_fx.TimestepOutOfGridError, match=f"timestep {outside}"):
            nearest_grid_index(grid, torch.tensor([outside]))


def _table() -> TimestepTableFakeQuantize:
    template = FakeQuantize(observer=MinMaxObserver, quant_min=0, quant_max=255)
    table = TimestepTableFakeQuantize(template)
    table.disable_fake_quant()
    return table


def test_each_sample_observes_and_uses_its_own_timesteps_entry():
    table = _table()
    ranges = {100: 1.0, 500: 10.0, 900: 100.0}
    t = torch.tensor([900, 100, 500, 100, 900, 500])
    x = torch.rand(6, 3, 4) * torch.tensor([ranges[int(v)] for v in t]).view(-1, 1, 1)
    x[:, 0, 0] = torch.tensor([ranges[int(v)] for v in t])  # each sample reaches its range
    table(x, t)  # observing a batch that mixes timesteps
    assert table.grid.tolist() == GRID
    for entry, top in zip(table.entries, ranges.values()):
        assert float(entry.scale) == pytest.approx(top / 255, rel=1e-5)
    table.disable_observer()
    table.enable_fake_quant()
    out = table(x, t)
    for i, v in enumerate(t.tolist()):
        entry = table.entries[GRID.index(v)]
        assert torch.equal(out[i : i + 1], entry(x[i : i + 1]))
        assert (out[i] - x[i]).abs().max() <= float(entry.scale) / 2 + 1e-6
    # a timestep between grid points uses the nearest entry; a number works as a timestep
    assert torch.equal(table(x[:1], 480), table.entries[1](x[:1]))


def _unet_with_tables(pts):
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model, batch=6)
    data = []
    for i in range(3):
        (x, _), kw = example_inputs(model, batch=6, seed=50 + i)
        data.append(((x, torch.tensor(GRID * 2)), kw))
    prepared = dmq_fx.prepare_fx(
        model,
        dmq_fx.get_default_qconfig_mapping(4, 8),
        a,
        k,
        pts="skip" if pts else None,
        timestep_tables=True,
    )
    dmq_fx.calibrate(prepared, data, dmq_fx.PRESETS["pts" if pts else "minmax"], progress=False)
    return model, prepared, data


@pytest.mark.parametrize("pts", [False, True], ids=["plain", "pts"])
def test_lowered_tables_select_the_right_entry_for_each_timestep(pts):
    model, prepared, data = _unet_with_tables(pts)
    for q in input_quantizers(prepared):
        assert isinstance(q, TimestepTableFakeQuantize) and q.grid.tolist() == GRID
    x = data[0][0][0][:2]
    with torch.no_grad():
        for backend in ("reference", "x86"):
            lowered = dmq_fx.convert_fx(prepared, backend)
            for t in (100, 301, 500, 900):
                sim = prepared(x, torch.tensor(t)).sample
                error = (sim - model(x, torch.tensor(t)).sample).abs().mean()
                out = lowered(x, torch.tensor(t)).sample
                if backend == "reference":
                    # same integers but for rare float ties in the quantize step
                    assert (out - sim).abs().mean() <= 0.05 * error, (backend, t)
                else:  # x86 also chunks the small-head attention: float rounding differs there
                    assert sqnr_db(sim, out) >= LOWERED_MIN_SQNR_DB, (backend, t)
            with pytest.raises(dmq_fx.TimestepOutOfGridError, match="outside"):
                lowered(x, torch.tensor(950))
            with pytest.raises(dmq_fx.TimestepOutOfGridError, match="one timestep per batch"):
                lowered(x, torch.tensor([100, 900]))
    rows = dmq_fx.summary(lowered).rows
    assert all("t-table" in r["dmq"] and r["form"] == "reference" for r in rows)
    assert all(".." in r["act_scale"] for r in rows)  # a range over the three timesteps
    if pts:
        assert any("pts:dequant" in r["dmq"] for r in rows)
    # the simulation itself accepts a batch mixing timesteps: each sample as in a batch of its
    # own timestep (same batch size, so the same float sums)
    with torch.no_grad():
        mixed = prepared(x, torch.tensor([100, 900])).sample
        for i, t in enumerate((100, 900)):
            uniform = prepared(x, torch.tensor(t)).sample
            assert torch.allclose(mixed[i], uniform[i], atol=1e-6)
