import math
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_DDPM, build_unet
from dmq_fx.quantize.modes import input_quantizers, weight_quantizers
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


def test_report_compares_every_layer_at_every_timestep(setup, tmp_path):
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
