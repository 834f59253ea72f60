"""Calibration, simulation and the reference form on the device the model is on.

Parametrized by device: the virtual accelerator of ``virtual_device`` (an op that mixes device
and host tensors fails, host reads are counted) and CUDA where one is present, each compared
with the same calibration on the CPU.
"""

import contextlib
import copy

import pytest
import tiny_pipelines
import torch
import virtual_device
from conftest import calibration_data
from diffusers import DDIMScheduler
from virtual_device import DeviceMismatch, module_to_virtual, on_virtual_device

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.metrics import sqnr_db
from dmq_fx.workflow.calibration_data import collect_calibration_data, step_features

DEVICES = ["cpu", "virtual"] + (["cuda"] if torch.cuda.is_available() else [])

#: the learned stages at a test budget
CHEAP = {
    "learn_les": dmq_fx.LearnLES(iterations=6, max_samples=8),
    "adaround": dmq_fx.AdaRound(iterations=6, max_samples=8),
    "fbr": dmq_fx.FBR(iterations=6, max_samples=8),
    "fbr_800": dmq_fx.FBR(iterations=6, max_samples=8),
    "tune_float_params": dmq_fx.TuneFloatParameters(iterations=4),
}


@contextlib.contextmanager
def device_context(device: str):
    if device == "virtual":
        with on_virtual_device() as counter:
            yield counter
    else:
        yield None


def to_device(module: torch.nn.Module, device: str) -> torch.nn.Module:
    return module_to_virtual(module) if device == "virtual" else module.to(device)


def tensors_to(value, device: str):
    target = virtual_device.DEVICE if device == "virtual" else torch.device(device)
    if isinstance(value, dict):
        return {k: tensors_to(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(tensors_to(v, device) for v in value)
    return value.to(target) if isinstance(value, torch.Tensor) else value


def host(t: torch.Tensor) -> torch.Tensor:
    return t.inner.clone() if isinstance(t, virtual_device.VirtualTensor) else t.cpu()


def calibrated_on(device, model, preset, **prepare):
    """``preset`` calibrated with the graph on ``device`` (CPU data), and its outputs (simulated
    and reference form) on a fixed batch, brought to the host."""
    args, kwargs = example_inputs(model, batch=4)
    flags = {**dmq_fx.PREPARE_FLAGS[preset], **prepare}
    prepared = dmq_fx.prepare_fx(
        model, dmq_fx.get_default_qconfig_mapping(4, 8), args, kwargs, **flags
    )
    stages = [CHEAP.get(s, s) for s in dmq_fx.PRESETS[preset].stages]
    test_args, test_kwargs = example_inputs(model, batch=2, seed=7)
    test_args = (test_args[0], test_args[1][:1].expand(2))  # one timestep: a table entry
    with device_context(device):
        to_device(prepared, device)
        dmq_fx.calibrate(prepared, calibration_data(model), stages, progress=False)
        places = {t.device for t in (*prepared.parameters(), *prepared.buffers())}
        test_args, test_kwargs = tensors_to(test_args, device), tensors_to(test_kwargs, device)
        simulated = prepared(*test_args, **test_kwargs).sample
        reference = dmq_fx.convert_fx(prepared, "reference")
        lowered = reference(*test_args, **test_kwargs).sample
        places |= {t.device for t in (*reference.parameters(), *reference.buffers())}
        places |= {simulated.device, lowered.device}
    return places, host(simulated), host(lowered)


@pytest.mark.parametrize(
    "config,preset,prepare",
    [
        (TINY_DDPM, "dmq", {}),
        (TINY_DDPM, "dmq+eda", {}),
        (TINY_SD, "minmax", {"timestep_tables": True}),
    ],
    ids=["ddpm-dmq", "ddpm-dmq+eda", "sd-tables"],
)
@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_calibration_runs_on_the_model_device(config, preset, prepare, device):
    model = build_unet(config)
    places, simulated, lowered = calibrated_on(device, model, preset, **prepare)
    assert places == {virtual_device.DEVICE if device == "virtual" else torch.device(device, 0)}
    _, cpu_simulated, cpu_lowered = calibrated_on("cpu", model, preset, **prepare)
    args, kwargs = example_inputs(model, batch=2, seed=7)
    with torch.no_grad():
        fp = model(args[0], args[1][:1].expand(2), **kwargs).sample
    # The device's kernels round differently (its attention is not the CPU's fused kernel), and
    # a calibration amplifies a float difference into other roundings: the two graphs agree far
    # above their quantization error (about 15 dB on these random W4A8 UNets) and are equally
    # good against the float model.
    for on_device, on_cpu in ((simulated, cpu_simulated), (lowered, cpu_lowered)):
        assert sqnr_db(on_cpu, on_device) > sqnr_db(fp, on_cpu) + 10
        assert abs(sqnr_db(fp, on_device) - sqnr_db(fp, on_cpu)) < 0.5


@pytest.mark.parametrize(
    "stages,prepare",
    [
        (
            lambda n: ["observe_weights", dmq_fx.LearnLES(iterations=n, max_samples=8)],
            {"les": True},
        ),
        (lambda n: ["observe_weights", dmq_fx.AdaRound(iterations=n, max_samples=8)], {}),
        (
            lambda n: [
                "observe_weights",
                "observe_activations",
                dmq_fx.FBR(iterations=n, max_samples=8),
            ],
            {},
        ),
    ],
    ids=["learn_les", "adaround", "fbr"],
)
def test_learning_loops_read_nothing_back_per_iteration(stages, prepare):
    """A host read (``.item()``, a copy to the CPU) waits for the accelerator's queue: the
    learning loops make none per iteration, so 3 and 9 iterations read back the same count."""
    model = build_unet(TINY_DDPM)
    args, kwargs = example_inputs(model, batch=4)
    reads = []
    for iterations in (3, 9):
        prepared = dmq_fx.prepare_fx(
            model, dmq_fx.get_default_qconfig_mapping(4, 8), args, kwargs, **prepare
        )
        with on_virtual_device() as counter:
            module_to_virtual(prepared)
            dmq_fx.calibrate(prepared, calibration_data(model), stages(iterations), progress=False)
            reads.append(counter.host_reads)
    assert reads[0] == reads[1] > 0


def test_x86_backend_refuses_a_graph_on_another_device():
    model = build_unet(TINY_DDPM)
    args, kwargs = example_inputs(model, batch=4)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(8, 8), args, kwargs)
    with on_virtual_device():
        module_to_virtual(prepared)
        dmq_fx.calibrate(prepared, calibration_data(model, n=1), "minmax", progress=False)
        with pytest.raises(
            dmq_fx.ConvertError,
            match=r"backend 'x86' runs onednn's CPU kernels and the graph is on virtual:0",
        ):
            dmq_fx.convert_fx(prepared, "x86")


def test_graph_split_across_devices_is_named():
    model = build_unet(TINY_DDPM)
    args, kwargs = example_inputs(model, batch=4)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(8, 8), args, kwargs)
    with on_virtual_device():
        module_to_virtual(prepared.conv_in)
        with pytest.raises(
            dmq_fx.ConfigError,
            match=r"more than one device: .* on (virtual:0|cpu), .* on (cpu|virtual:0)",
        ):
            dmq_fx.calibrate(prepared, calibration_data(model, n=1), "minmax", progress=False)


def test_harness_catches_a_host_tensor_in_a_device_op():
    """The check the tests above rely on: a tensor made without ``device=`` fails."""
    with on_virtual_device():
        x = torch.ones(3).to(virtual_device.DEVICE)
        with pytest.raises(DeviceMismatch, match="aten.mul.Tensor"):
            x * torch.ones(3)
        assert torch.equal(host(x * torch.tensor(2.0)), torch.full((3,), 2.0))  # 0-dim: allowed


def test_sampler_data_is_collected_on_the_model_device():
    """The sampler runs where the UNet is (guided, text-conditional) and records the same
    trajectories as on the CPU, returned on the CPU; TDAC's step features likewise."""
    model = build_unet(TINY_SD)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randn(2, 4, TINY_SD["cross_attention_dim"], generator=g)
    empty = torch.zeros(1, 4, TINY_SD["cross_attention_dim"])
    sampler = dict(
        num_inference_steps=3,
        samples_per_step=3,
        prompt_embeds=prompts,
        negative_prompt_embeds=empty,
        guidance_scale=4.0,
        independent_trajectories=False,
        batch_size=2,
        seed=5,
        progress=False,
    )
    on_cpu = collect_calibration_data(model, DDIMScheduler(), **sampler)
    rows_cpu, features_cpu = step_features(model, on_cpu, progress=False)
    with on_virtual_device() as counter:
        unet = module_to_virtual(copy.deepcopy(model))
        on_device = collect_calibration_data(unet, DDIMScheduler(), **sampler)
        rows, features = step_features(unet, on_cpu, progress=False)
        assert counter.host_reads > 0  # the records and features come back
    assert next(model.parameters()).device.type == "cpu"  # the user's model stays
    for name in ("timestep", "step_index", "unconditional", "trajectory"):
        assert torch.equal(getattr(on_device, name), getattr(on_cpu, name)), name
    for name in ("sample", "encoder_hidden_states"):
        value = getattr(on_device, name)
        assert value.device.type == "cpu" and type(value) is torch.Tensor, name
        torch.testing.assert_close(value, getattr(on_cpu, name), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(rows, rows_cpu))
    for a, b in zip(features, features_cpu):
        assert type(a) is torch.Tensor
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_pipeline_on_the_device_quantizes_there(tmp_path):
    """quantize_pipeline on a text pipeline whose modules are on the device: prompts encoded,
    sampled, traced, calibrated and converted (reference form) there, agreeing with the same
    pipeline quantized on the CPU; the x86 backend is refused before any calibration."""
    pipe = tiny_pipelines._sd(
        tmp_path, build_unet(TINY_SD), DDIMScheduler(steps_offset=1, clip_sample=False)
    )
    config = {"preset": "minmax", "backend": "reference", "num_inference_steps": 2,
              "samples_per_step": 2, "batch_size": 4}  # fmt: skip
    calibration = {"prompts": ["a cat", "a dog"], "guidance_scale": 4.0}
    on_cpu = dmq_fx.quantize_pipeline(pipe, config, calibration, progress=False)
    args, kwargs = example_inputs(pipe.unet, batch=2, seed=3)
    with torch.no_grad():
        fp = pipe.unet(*args, **kwargs).sample
        expected = on_cpu.unet(*args, **kwargs).sample
    with on_virtual_device() as counter:
        for name in ("unet", "vae", "text_encoder"):
            module_to_virtual(getattr(pipe, name))
        with pytest.raises(dmq_fx.ConfigError, match=r"UNet is on virtual:0 and backend 'x86'"):
            dmq_fx.quantize_pipeline(pipe, {**config, "backend": "x86"}, calibration)
        assert counter.host_reads == 0  # refused before encoding or sampling anything
        quantized = dmq_fx.quantize_pipeline(pipe, config, calibration, progress=False)
        graph = quantized.unet.graph
        assert {t.device for t in (*graph.parameters(), *graph.buffers())} == {
            virtual_device.DEVICE
        }
        with torch.no_grad():
            out = host(
                quantized.unet(*tensors_to(args, "virtual"), **tensors_to(kwargs, "virtual")).sample
            )
    assert sqnr_db(expected, out) > sqnr_db(fp, expected) + 10
