import json

import pytest
import torch
from conftest import assert_unchanged, calibration_data, state_snapshot
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dmq_fx
from dmq_fx.graph.meta import graph_state
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs


def _calibrated(config, preset, wb=4, ab=8, **flags):
    model = build_unet(config)
    a, k = example_inputs(model, batch=4)
    prepared = dmq_fx.prepare_fx(
        model,
        dmq_fx.get_default_qconfig_mapping(wb, ab),
        a,
        k,
        **{**dmq_fx.PREPARE_FLAGS[preset], **flags},
    )
    fast = {
        "learn_les": dmq_fx.LearnLES(iterations=2, max_samples=8),
        "adaround": dmq_fx.AdaRound(iterations=2, max_samples=8),
        "fbr": dmq_fx.FBR(iterations=2, max_samples=8, step_lr=1e-2),
        "fbr_800": dmq_fx.FBR(iterations=2, max_samples=8, step_lr=1e-2),
        "tune_float_params": dmq_fx.TuneFloatParameters(iterations=2),
    }
    stages = [fast.get(s, s) for s in dmq_fx.PRESETS[preset]]
    dmq_fx.calibrate(prepared, calibration_data(model), stages, progress=False)
    return model, prepared


@pytest.mark.parametrize(
    "config,preset,flags",
    [
        (TINY_DDPM, "dmq", {}),
        (TINY_SD, "eda-dm", {}),
        (TINY_SD, "pts", {"timestep_tables": True}),
    ],
    ids=["ddpm-dmq", "sd-eda-dm", "sd-pts-tables"],
)
def test_round_trip_rebuilds_a_bit_identical_graph(tmp_path, config, preset, flags):
    model, prepared = _calibrated(config, preset, **flags)
    lowered = dmq_fx.convert_fx(prepared, "x86")
    dmq_fx.save(lowered, tmp_path / "q.safetensors")
    dmq_fx.save(prepared, tmp_path / "calibrated.safetensors")
    snapshot = state_snapshot(model)
    loaded = dmq_fx.load(tmp_path / "q.safetensors", model)
    assert_unchanged(model, snapshot)
    assert graph_state(loaded).state == "converted"
    calibrated = dmq_fx.load(tmp_path / "calibrated.safetensors", model)
    assert graph_state(calibrated).state == "calibrated"
    assert graph_state(calibrated).stages_run == graph_state(prepared).stages_run
    a, k = example_inputs(model, batch=3, seed=11)
    if flags.get("timestep_tables"):
        a = (a[0], torch.full_like(a[1], 500))  # one calibrated-range timestep per call
    with torch.no_grad():
        expected = lowered(*a, **k).sample
        assert torch.equal(loaded(*a, **k).sample, expected)
        assert torch.equal(dmq_fx.convert_fx(calibrated, "x86")(*a, **k).sample, expected)
        assert torch.equal(calibrated(*a, **k).sample, prepared(*a, **k).sample)
    assert dmq_fx.summary(loaded).rows == dmq_fx.summary(lowered).rows
    # only what calibration learned is in the file, no float weights
    saved = load_file(str(tmp_path / "q.safetensors"))
    assert not any(key.endswith((".original", ".bias")) for key in saved)
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as f:
        config_json = json.loads(f.metadata()["config"])
    assert config_json["backend"] == "x86" and config_json["prepare"]["les"] == (preset == "dmq")


def test_load_refuses_other_models_formats_and_corrupted_files(tmp_path):
    model, prepared = _calibrated(TINY_DDPM, "minmax")
    path = tmp_path / "q.safetensors"
    dmq_fx.save(prepared, path)
    other_arch = build_unet({**TINY_DDPM, "block_out_channels": (16, 32, 48)})
    with pytest.raises(dmq_fx.LoadError, match="another config"):
        dmq_fx.load(path, other_arch)
    with pytest.raises(dmq_fx.LoadError, match="UNet2DModel, got a"):
        dmq_fx.load(path, build_unet(TINY_SD))
    retrained = build_unet(TINY_DDPM)
    with torch.no_grad():
        retrained.conv_in.weight.add_(0.01)
    with pytest.raises(dmq_fx.LoadError, match="other weights"):
        dmq_fx.load(path, retrained)
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    older = tmp_path / "older.safetensors"  # format 1 held roundings unpacked
    save_file(tensors, str(older), metadata={**metadata, "format": "dmq_fx.quantized/1"})
    with pytest.raises(dmq_fx.LoadError, match="quantized/1"):
        dmq_fx.load(older, model)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(dmq_fx.LoadError, match="corrupted"):
        dmq_fx.load(broken, model)
    tensors.pop(next(iter(tensors)))
    missing = tmp_path / "missing.safetensors"
    save_file(tensors, str(missing), metadata=metadata)
    with pytest.raises(dmq_fx.LoadError, match="do not fit"):
        dmq_fx.load(missing, model)
    assert graph_state(dmq_fx.load(path, model)).state == "calibrated"


def test_save_needs_a_calibrated_graph(tmp_path):
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model, batch=2)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(4, 8), a, k)
    with pytest.raises(dmq_fx.ConfigError, match="calibrated graph"):
        dmq_fx.save(prepared, tmp_path / "q.safetensors")
    with pytest.raises(dmq_fx.ConfigError, match="calibrated graph"):
        dmq_fx.save(model, tmp_path / "q.safetensors")
    assert not (tmp_path / "q.safetensors").exists()
