import math
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler

import dmq_fx
import dmq_fx.workflow.report as report_module
from dmq_fx.graph.unet_configs import TINY_DDPM, build_unet
from dmq_fx.quantize.modes import input_quantizers, quantizer_mode, weight_quantizers
from dmq_fx.workflow.calibration_data import collect_calibration_data
from dmq_fx.workflow.report import sqnr_db


@pytest.fixture(scope="module")
def setup():
    model = build_unet(TINY_DDPM)
    data = collect_calibration_data(
        model, DDIMScheduler(), num_inference_steps=3, samples_per_step=4, progress=False
    )
    graphs = {}
    for wb, ab in ((8, 8), (4, 6)):
        args, kwargs = next(data.batches(4, shuffle=False))
        prepared = dmq_fx.prepare_fx(
            model, dmq_fx.get_default_qconfig_mapping(wb, ab), args, kwargs, pts="skip"
        )
        dmq_fx.calibrate(prepared, list(data.batches(8)), dmq_fx.PRESETS["pts"], progress=False)
        graphs[(wb, ab)] = prepared
    return model, data, graphs


def test_sqnr_by_hand():
    ref = torch.tensor([3.0, 4.0])
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(ref, torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25))


def test_report_compares_every_layer_at_every_timestep(setup, tmp_path, monkeypatch):
    model, data, graphs = setup
    prepared = graphs[(4, 6)]
    flags = [
        (bool(q.fake_quant_enabled[0]), bool(q.observer_enabled[0]))
        for q in input_quantizers(prepared) + weight_quantizers(prepared)
    ]
    result = dmq_fx.report(model, prepared, data, progress=False)
    after = [
        (bool(q.fake_quant_enabled[0]), bool(q.observer_enabled[0]))
        for q in input_quantizers(prepared) + weight_quantizers(prepared)
    ]
    assert flags == after  # the user's graph is left as it was
    layers = dmq_fx.summary(prepared).rows
    assert len(result.layers) == len(layers)
    assert len(result.per_timestep) == len(layers) * len(data.timesteps)
    assert all(math.isfinite(r["sqnr_db"]) and r["sqnr_db"] > 0 for r in result.per_timestep)
    assert any(r["pts_exponents"] for r in result.layers)
    # the same numbers from the converted graph (rebuilt in fake-quant form on the float model)
    lowered = dmq_fx.convert_fx(prepared, "x86")
    again = dmq_fx.report(model, lowered, data, progress=False)
    assert again.per_timestep == result.per_timestep
    # 8-bit quantization loses less than 4-bit weights and 6-bit activations, layer by layer
    fine = dmq_fx.report(model, graphs[(8, 8)], data, progress=False)
    better = [a["sqnr_db_mean"] > b["sqnr_db_mean"] for a, b in zip(fine.layers, result.layers)]
    assert all(better)
    figures = {}
    original_save = report_module._save

    def keep(fig, path):
        figures[path.name] = [(ax.get_images(), ax.patches) for ax in fig.axes]
        return original_save(fig, path)

    monkeypatch.setattr(report_module, "_save", keep)
    written = result.write(tmp_path / "report")
    names = {p.name for p in written}
    assert {
        "report.md",
        "per_timestep.csv",
        "sqnr_per_timestep.png",
        "input_ranges.png",
        "sqnr_per_layer.png",
        "pts_exponents.png",
    } <= names
    assert all(p.stat().st_size > 0 for p in written)
    header = (tmp_path / "report" / "per_timestep.csv").read_text().splitlines()[0]
    assert header == "layer,timestep,sqnr_db,input_min,input_max"
    assert str(result).count("\n") == len(layers) + 1
    # the plots show the report's numbers: the heat map is the SQNR table (layers x timesteps,
    # noisiest first), the bars the per-layer means
    names_, steps = [r["layer"] for r in result.layers], sorted(data.timesteps, reverse=True)
    table = {(r["layer"], r["timestep"]): r["sqnr_db"] for r in result.per_timestep}
    expected = torch.tensor([[table[(n, t)] for t in steps] for n in names_])
    images, _ = figures["sqnr_per_timestep.png"][0]
    torch.testing.assert_close(torch.as_tensor(images[0].get_array()).float(), expected.float())
    _, bars = figures["sqnr_per_layer.png"][0]
    assert [round(b.get_width(), 2) for b in bars] == [r["sqnr_db_mean"] for r in result.layers]
    _, pts_bars = figures["pts_exponents.png"][0]
    assert sum(b.get_width() for b in pts_bars) == sum(sum(r["pts_counts"]) for r in result.layers)


def test_report_sqnr_equals_a_direct_computation(setup):
    """One layer, every timestep: the float layer on the float model's own input against the
    fake-quantized layer on the same input, computed here without the report's machinery."""
    model, data, graphs = setup
    prepared = graphs[(4, 6)]
    result = dmq_fx.report(model, prepared, data, progress=False)
    name = "down_blocks.0.resnets.0.conv1"
    layer = model.get_submodule(name)
    for t in sorted(data.timesteps, reverse=True):
        rows = torch.nonzero(data.timestep == t).flatten()[:16]
        ((args, kwargs),) = data.subset(rows).batches(len(rows), shuffle=False)
        seen = []
        handle = layer.register_forward_pre_hook(lambda m, i, seen=seen: seen.append(i[0]))
        with torch.no_grad():
            model(*args, **kwargs)
            handle.remove()
            fp = layer(seen[0])
            with quantizer_mode(prepared, "simulate"):
                q = prepared.get_submodule(name)(
                    prepared.get_submodule(f"{name}_input_quant")(seen[0])
                )
        row = next(r for r in result.per_timestep if (r["layer"], r["timestep"]) == (name, t))
        assert row["sqnr_db"] == pytest.approx(sqnr_db(fp, q), abs=2e-3)
        assert row["input_min"] == pytest.approx(float(seen[0].min()), abs=1e-6)


def test_report_cli_writes_the_folder(setup, tmp_path):
    model, data, graphs = setup
    model.save_pretrained(tmp_path / "unet")
    dmq_fx.save(graphs[(4, 6)], tmp_path / "q.safetensors")
    data.save(tmp_path / "calib.safetensors")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dmq_fx",
            "report",
            "--unet",
            str(tmp_path / "unet"),
            "--quantized",
            str(tmp_path / "q.safetensors"),
            "--calibration",
            str(tmp_path / "calib.safetensors"),
            "--samples-per-step",
            "2",
            "--out",
            str(tmp_path / "r"),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "r" / "sqnr_per_timestep.png").stat().st_size > 0
    assert "sqnr_db_mean" in out.stdout
