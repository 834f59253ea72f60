"""SDXL, LCM and ControlNet pipelines: calibration recorded from the pipeline's own call, and
quantize_pipeline end to end (tiny pipelines built offline, tests/tiny_pipelines.py); SD 2.x
with a v-prediction scheduler through dmq_fx's own sampler."""

import numpy as np
import pytest
import tiny_pipelines
import torch

import dmq_fx
from dmq_fx.workflow.calibration_data import CalibrationData, record_pipeline_inputs

CALL = {"num_inference_steps": 3, "height": 16, "width": 16}


def _pipe_and_call(name, folder):
    pipe = getattr(tiny_pipelines, name)(folder)
    extra = {"guidance_scale": 4.0} if name != "lcm" else {}
    if name == "controlnet":
        extra["pipeline_kwargs"] = {
            "image": torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        }
    return pipe, extra


@pytest.mark.parametrize("name", ["sdxl", "lcm", "controlnet"])
def test_recorded_inputs_are_the_unets_own(name, tmp_path):
    """Every UNet call of the pipeline is recorded row by row, nested inputs included, and
    replaying the recorded rows through the float UNet gives what the pipeline's UNet gave."""
    pipe, extra = _pipe_and_call(name, tmp_path)
    call = {**CALL, **extra.pop("pipeline_kwargs", {}), **extra}
    outputs = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: outputs.append(o[0]))
    data = record_pipeline_inputs(pipe, ["a cat", "a dog"], progress=False, **call)
    handle.remove()
    guided = name != "lcm"
    assert len(data) == 3 * 2 * (2 if guided else 1)
    assert int(data.unconditional.sum()) == (len(data) // 2 if guided else 0)
    assert data.guidance_scale == (4.0 if guided else 1.0)  # the pipeline's, as it ran
    assert len(data.timesteps) == 3
    expected_extra = {
        "sdxl": {"added_cond_kwargs/text_embeds", "added_cond_kwargs/time_ids"},
        "lcm": {"timestep_cond"},
        "controlnet": {f"down_block_additional_residuals/#{i}" for i in range(4)}
        | {"mid_block_additional_residual"},
    }[name]
    assert set(data.extra) == expected_extra
    rows = 4 if guided else 2
    first = data.subset(torch.arange(rows))  # the first call's rows, in order
    ((args, kwargs),) = first.batches(rows, shuffle=False)
    with torch.no_grad():
        again = pipe.unet(*args, **kwargs).sample
    torch.testing.assert_close(again, outputs[0], atol=1e-5, rtol=1e-5)
    # saved and loaded with its nested inputs
    data.save(tmp_path / "calib.safetensors")
    loaded = CalibrationData.load(tmp_path / "calib.safetensors")
    assert loaded.extra.keys() == data.extra.keys()
    assert all(torch.equal(loaded.extra[k], v) for k, v in data.extra.items())


@pytest.mark.parametrize("name", ["sdxl", "lcm", "controlnet", "sd2_v"])
def test_quantize_pipeline_end_to_end(name, tmp_path):
    pipe, extra = _pipe_and_call(name, tmp_path)
    calibration = {"prompts": ["a cat", "a dog"], **extra}
    config = {"preset": "minmax", "weight_bits": 8, "num_inference_steps": 3, "batch_size": 8}
    q = dmq_fx.quantize_pipeline(pipe, config, calibration=calibration, progress=False)
    assert isinstance(q.unet, dmq_fx.QuantizedUNet) and type(q) is type(pipe)
    call = {**CALL, **extra.get("pipeline_kwargs", {}), "output_type": "np"}
    call.update({k: v for k, v in extra.items() if k == "guidance_scale"})
    fp = pipe("a cat", generator=torch.Generator().manual_seed(1), **call).images
    qi = q("a cat", generator=torch.Generator().manual_seed(1), **call).images
    # the same image, quantized: far closer to the float image than a different seed's
    other = pipe("a cat", generator=torch.Generator().manual_seed(2), **call).images
    assert 0 < np.abs(qi - fp).mean() < 0.2 * np.abs(other - fp).mean()


def test_tdac_selects_from_a_recorded_sdxl_pool(tmp_path):
    """select_samples on trajectories recorded from the SDXL pipeline's own call: n samples
    spread over the steps, both guidance halves of each, nested inputs kept."""
    from dmq_fx.workflow.calibration_data import select_samples

    pipe, extra = _pipe_and_call("sdxl", tmp_path)
    prompts = ["a cat", "a dog", "a hat", "a bag"]
    pool = record_pipeline_inputs(pipe, prompts, progress=False, **CALL, **extra)
    chosen = select_samples(pipe.unet, n=4, pool=pool, progress=False, min_per_step=1)
    assert len(chosen) == 2 * 4 and int(chosen.unconditional.sum()) == 4
    assert set(chosen.timestep.tolist()) == set(pool.timestep.tolist())  # every step, >= 1 each
    assert chosen.extra.keys() == pool.extra.keys()
    with pytest.raises(dmq_fx.ConfigError, match="pool of 4 trajectories"):
        select_samples(pipe.unet, n=5, pool=pool, progress=False)
    config = {"preset": "minmax", "weight_bits": 8, "num_inference_steps": 3, "selection": "tdac"}
    q = dmq_fx.quantize_pipeline(
        pipe, config, calibration={"prompts": prompts, **extra}, progress=False
    )
    assert isinstance(q.unet, dmq_fx.QuantizedUNet)


def test_the_sampler_collector_names_the_pipeline_recorder_for_sdxl():
    from dmq_fx.graph.unet_configs import TINY_SDXL, build_unet
    from dmq_fx.workflow.calibration_data import collect_calibration_data

    with pytest.raises(dmq_fx.CalibrationError, match="record_pipeline_inputs"):
        collect_calibration_data(build_unet(TINY_SDXL), samples_per_step=2, progress=False)
