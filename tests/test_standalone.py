"""Standalone checkpoints: save(converted, path, standalone=True) and load(path) without the
float model."""

import functools

import pytest
import torch
from conftest import calibration_data
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from safetensors.torch import save_file

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.lowering.quantized_modules import QuantizedLayer
from dmq_fx.workflow.serialization import _model_from_config


@functools.cache
def _converted(config_name, backend):
    """W4A8 with the dmq preset's structure (LES in norms and steps, PTS shifts, AdaRound)."""
    model = build_unet({"sd": TINY_SD, "ddpm": TINY_DDPM}[config_name])
    a, k = example_inputs(model, batch=4)
    prepared = dmq_fx.prepare_fx(
        model, dmq_fx.get_default_qconfig_mapping(4, 8), a, k, **dmq_fx.PREPARE_FLAGS["dmq"]
    )
    stages = [
        dmq_fx.LearnLES(iterations=5, max_samples=8),
        "observe_activations",
        "vote_pts",
        "observe_weights",
        dmq_fx.AdaRound(iterations=5, max_samples=8),
    ]
    dmq_fx.calibrate(prepared, calibration_data(model), stages, progress=False)
    return model, dmq_fx.convert_fx(prepared, backend)


@pytest.mark.parametrize("config_name", ["sd", "ddpm"])
@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_standalone_file_rebuilds_the_same_graph_without_the_float_model(
    config_name, backend, tmp_path
):
    model, converted = _converted(config_name, backend)
    path = tmp_path / "q.safetensors"
    dmq_fx.save(converted, path, standalone=True)
    loaded = dmq_fx.load(path)  # no float model
    a, k = example_inputs(model, batch=3, seed=11)
    with torch.no_grad():
        assert torch.equal(loaded(*a, **k).sample, converted(*a, **k).sample)
    forms = {n: m.form for n, m in converted.named_modules() if isinstance(m, QuantizedLayer)}
    assert {n: m.form for n, m in loaded.named_modules() if isinstance(m, QuantizedLayer)} == forms
    rewrites = [r["dmq"] for r in dmq_fx.summary(loaded).rows]
    assert any("pts:shift" in r for r in rewrites) and any("les:" in r for r in rewrites)
    # 4-bit weights reach the disk (tiny models: float layers and per-channel steps weigh more;
    # the reference-model target is test_fashion28_standalone_file_is_a_third_of_fp32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "fp.st")
    ratio = path.stat().st_size / (tmp_path / "fp.st").stat().st_size
    assert ratio <= 0.5, ratio
    # with the float model it was calibrated on, the same; with another, refused
    again = dmq_fx.load(path, model)
    with torch.no_grad():
        assert torch.equal(again(*a, **k).sample, converted(*a, **k).sample)
    with pytest.raises(dmq_fx.LoadError, match="other weights"):
        dmq_fx.load(path, build_unet(TINY_SD if config_name == "sd" else TINY_DDPM, seed=1))


def test_standalone_needs_a_converted_graph_and_plain_files_need_the_model(tmp_path):
    model, converted = _converted("ddpm", "x86")
    prepared_path = tmp_path / "plain.safetensors"
    dmq_fx.save(converted, prepared_path)
    with pytest.raises(dmq_fx.LoadError, match="holds the calibration only"):
        dmq_fx.load(prepared_path)
    a, k = example_inputs(model, batch=4)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(4, 8), a, k)
    dmq_fx.calibrate(prepared, calibration_data(model), progress=False)
    with pytest.raises(dmq_fx.ConfigError, match="convert_fx"):
        dmq_fx.save(prepared, tmp_path / "x.safetensors", standalone=True)


def test_nibble_packing_round_trips():
    from dmq_fx.quantize.bitpacking import pack_nibbles, unpack_nibbles

    values = torch.randint(0, 16, (5, 3, 3, 3), generator=torch.Generator().manual_seed(0))
    values = values.to(torch.uint8)
    packed = pack_nibbles(values)
    assert packed.numel() == (values.numel() + 1) // 2
    assert torch.equal(unpack_nibbles(packed, list(values.shape)), values)


def test_fashion28_standalone_file_is_a_third_of_fp32(tmp_path):
    """The committed reference model at W4A8 (DMQ structure): the standalone file is at most
    0.35x its fp32 safetensors, and loads to the same outputs."""
    from dmq_fx_bench.reference_models import load_fashion28

    unet, _ = load_fashion28()
    data = [example_inputs(unet, batch=8, seed=s) for s in range(2)]
    prepared = dmq_fx.prepare_fx(
        unet, dmq_fx.get_default_qconfig_mapping(4, 8), *data[0], **dmq_fx.PREPARE_FLAGS["dmq"]
    )
    stages = ["smoothquant", "observe_activations", "vote_pts", "observe_weights"]
    dmq_fx.calibrate(prepared, data, stages, progress=False)
    converted = dmq_fx.convert_fx(prepared, "x86")
    dmq_fx.save(converted, tmp_path / "q.safetensors", standalone=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp_path / "fp.st")
    ratio = (tmp_path / "q.safetensors").stat().st_size / (tmp_path / "fp.st").stat().st_size
    assert ratio <= 0.35, ratio
    a, k = example_inputs(unet, batch=2, seed=3)
    with torch.no_grad():
        loaded = dmq_fx.load(tmp_path / "q.safetensors")(*a, **k).sample
        assert torch.equal(loaded, converted(*a, **k).sample)


def test_a_graph_with_nested_inputs_saves_and_loads(tmp_path):
    """SDXL's dict input is recorded in the file's example spec and rebuilt on load."""
    from dmq_fx.graph.unet_configs import TINY_SDXL

    model = build_unet(TINY_SDXL)
    a, k = example_inputs(model, batch=4)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(4, 8), a, k)
    data = [example_inputs(model, batch=4, seed=s) for s in range(2)]
    dmq_fx.calibrate(prepared, data, progress=False)
    converted = dmq_fx.convert_fx(prepared, "x86")
    dmq_fx.save(converted, tmp_path / "standalone.st", standalone=True)
    dmq_fx.save(converted, tmp_path / "plain.st")
    a2, k2 = example_inputs(model, batch=3, seed=5)
    with torch.no_grad():
        expected = converted(*a2, **k2).sample
        assert torch.equal(dmq_fx.load(tmp_path / "standalone.st")(*a2, **k2).sample, expected)
        assert torch.equal(dmq_fx.load(tmp_path / "plain.st", model)(*a2, **k2).sample, expected)


class Tabled(ModelMixin, ConfigMixin):
    """A model that computes a non-persistent buffer when built (no file holds it)."""

    @register_to_config
    def __init__(self, size: int = 4):
        super().__init__()
        self.proj = torch.nn.Linear(size, size)
        self.register_buffer("table", torch.arange(float(size)), persistent=False)


def test_standalone_load_builds_the_model_without_random_initialization():
    """The model a standalone file is loaded into is built on the meta device and zero-filled
    (the file replaces every weight), unless it computes a table when built."""
    model = build_unet(TINY_SD)
    model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    config = {"model_class": model_class, "model_config": dict(model.config)}
    built = _model_from_config(config, "f.safetensors")
    assert type(built) is type(model) and not built.training
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert all(t.device.type == "cpu" and not t.any() for t in built.state_dict().values())
    tabled = _model_from_config(
        {"model_class": f"{__name__}.Tabled", "model_config": {"size": 3}}, "f.safetensors"
    )
    assert torch.equal(tabled.table, torch.arange(3.0)) and tabled.proj.weight.any()
