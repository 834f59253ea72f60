import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from dmq_fx_bench.datasets import load_fashion_mnist

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.workflow.calibration_data import CalibrationData, collect_calibration_data

STEPS, PER_STEP = 5, 6


def ddim():
    return DDIMScheduler(beta_schedule="squaredcos_cap_v2")


@pytest.fixture(scope="module")
def ddpm():
    return build_unet(TINY_DDPM)


def _collect(unet):
    return collect_calibration_data(
        unet,
        ddim(),
        num_inference_steps=STEPS,
        samples_per_step=PER_STEP,
        batch_size=4,
        seed=3,
        progress=False,
    )


@pytest.fixture(scope="module")
def collected(ddpm):
    return _collect(ddpm)


def test_fashion_mnist_loader():
    x, y = load_fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [6000] * 10
    xt, yt = load_fashion_mnist("test")
    assert xt.shape == (10000, 28, 28) and np.bincount(yt).tolist() == [1000] * 10
    assert x.max() == 255 and x.min() == 0
    with pytest.raises(ValueError, match="split must be"):
        load_fashion_mnist("val")
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root="/nonexistent")


def test_collector_records_every_sampler_step(collected):
    expected = ddim()
    expected.set_timesteps(STEPS)
    assert collected.timesteps == expected.timesteps.tolist()
    assert len(collected) == STEPS * PER_STEP
    assert collected.sample.shape == (STEPS * PER_STEP, 3, 16, 16)
    assert torch.bincount(collected.step_index).tolist() == [PER_STEP] * STEPS
    for k, t in enumerate(collected.timesteps):
        assert (collected.timestep[collected.step_index == k] == t).all()
    # the first step's inputs are the initial noise of fresh trajectories
    first = collected.sample[collected.step_index == 0]
    assert abs(first.std().item() - 1.0) < 0.05 and abs(first.mean().item()) < 0.05
    # later steps are denoised inputs, not noise
    assert not torch.allclose(collected.sample[collected.step_index == 1], first)


def test_collector_is_deterministic_and_seeded(ddpm, collected):
    again = collect_calibration_data(
        ddpm,
        ddim(),
        num_inference_steps=STEPS,
        samples_per_step=PER_STEP,
        batch_size=4,
        seed=3,
        progress=False,
    )
    assert torch.equal(again.sample, collected.sample)
    other = collect_calibration_data(
        ddpm,
        ddim(),
        num_inference_steps=STEPS,
        samples_per_step=PER_STEP,
        batch_size=4,
        seed=4,
        progress=False,
    )
    assert not torch.equal(other.sample, collected.sample)


def test_collector_records_both_guidance_halves():
    model = build_unet(TINY_SD)
    prompts, empty = torch.randn(3, 7, 24), torch.zeros(1, 7, 24)
    data = collect_calibration_data(
        model,
        ddim(),
        num_inference_steps=3,
        samples_per_step=4,
        prompt_embeds=prompts,
        negative_prompt_embeds=empty,
        guidance_scale=7.5,
        progress=False,
    )
    assert len(data) == 2 * 3 * 4
    unc = data.unconditional
    assert unc.sum() == len(data) // 2
    assert (data.encoder_hidden_states[unc] == 0).all()
    assert all(any(torch.equal(e, p) for p in prompts) for e in data.encoder_hidden_states[~unc])
    # both halves of one UNet call see the same x_t
    assert torch.equal(data.sample[unc], data.sample[~unc])
    assert data.guidance_scale == 7.5 and data.subset(unc).guidance_scale == 7.5
    with pytest.raises(dmq_fx.ConfigError, match="needs prompt_embeds"):
        collect_calibration_data(model, ddim(), guidance_scale=7.5, progress=False)


def _guided_data(steps=3, per_step=4):
    return collect_calibration_data(
        build_unet(TINY_SD),
        ddim(),
        num_inference_steps=steps,
        samples_per_step=per_step,
        prompt_embeds=torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(0)),
        negative_prompt_embeds=torch.zeros(1, 7, 24),
        guidance_scale=7.5,
        progress=False,
    )


def test_guidance_pair_batches_hold_both_halves_of_each_call(collected):
    data = _guided_data()
    batches = list(data.batches(6, seed=1, guidance_pairs=True))
    assert [b[0][0].shape[0] for b in batches] == [6, 6, 6, 6]
    seen = []
    for (sample, t), kwargs in batches:
        u, c = sample.chunk(2)
        # a pipeline's layout: the unconditional rows, then the same samples conditioned
        assert torch.equal(u, c) and torch.equal(*t.chunk(2))
        ctx_u, ctx_c = kwargs["encoder_hidden_states"].chunk(2)
        assert (ctx_u == 0).all() and (ctx_c != 0).any(dim=(1, 2)).all()
        seen.append(u)
    # every call once: the unconditional halves, in a seeded order
    rows = torch.cat(seen)
    assert rows.shape[0] == len(data) // 2

    def keys(x):  # each row by a key of its own (a row sum), in sorted order
        return x.flatten(1).sum(1).sort().values

    assert torch.equal(keys(rows), keys(data.sample[data.unconditional]))
    ordered = torch.cat(
        [b[0][0].chunk(2)[0] for b in data.batches(6, guidance_pairs=True, shuffle=False)]
    )
    assert torch.equal(ordered, data.sample[data.unconditional])
    assert not torch.equal(rows, ordered)
    with pytest.raises(dmq_fx.ConfigError, match="even batch_size >= 2, got 5"):
        next(data.batches(5, guidance_pairs=True))
    with pytest.raises(dmq_fx.CalibrationError, match="no classifier-free guidance halves"):
        next(collected.batches(4, guidance_pairs=True))
    one_lost = data.subset(torch.arange(len(data)) != int(torch.nonzero(~data.unconditional)[0]))
    with pytest.raises(dmq_fx.CalibrationError, match="do not pair one to one"):
        next(one_lost.batches(4, guidance_pairs=True))
    # a conditional row whose unconditional half is missing is named too
    lone = int(torch.nonzero(data.unconditional)[0])
    partner = int(data.guidance_pairs()[1][0])
    other_lost = data.subset(torch.arange(len(data)) != lone)
    row = partner - (partner > lone)  # its index once the row before it is gone
    with pytest.raises(dmq_fx.CalibrationError, match=rf"first unpaired row: {row}\)"):
        next(other_lost.batches(4, guidance_pairs=True))


def test_round_trip_and_wrong_file(tmp_path, collected):
    path = tmp_path / "calib.safetensors"
    collected.save(path)
    loaded = CalibrationData.load(path)
    assert loaded.guidance_scale == collected.guidance_scale == 1.0
    guided = _guided_data()
    guided.save(tmp_path / "guided.safetensors")
    assert CalibrationData.load(tmp_path / "guided.safetensors").guidance_scale == 7.5
    assert torch.equal(loaded.sample, collected.sample)
    assert torch.equal(loaded.timestep, collected.timestep)
    assert loaded.encoder_hidden_states is None
    from safetensors.torch import save_file

    save_file({"sample": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(dmq_fx.CalibrationError, match="not a dmq_fx calibration file"):
        CalibrationData.load(tmp_path / "other.safetensors")


def test_collected_data_calibrates_a_prepared_unet(ddpm, collected):
    args, kwargs = example_inputs(ddpm)
    prepared = dmq_fx.prepare_fx(ddpm, dmq_fx.get_default_qconfig_mapping(4, 8), args, kwargs)
    batches = list(collected.batches(8))
    assert sum(b[0][0].shape[0] for b in batches) == len(collected)
    assert len({int(t) for b in batches[:1] for t in b[0][1]}) > 1  # timesteps mixed
    dmq_fx.calibrate(prepared, batches, progress=False)
    # a direct computation: the layer's float inputs over the batches, in order, through a fresh
    # torch.ao observer of the same kind
    name = "down_blocks.0.resnets.0.conv1"
    fq = prepared.get_submodule(f"{name}_input_quant")
    observer = type(fq.activation_post_process)(
        averaging_constant=fq.activation_post_process.averaging_constant,
        quant_min=fq.quant_min,
        quant_max=fq.quant_max,
        dtype=torch.quint8,
    )
    hook = ddpm.get_submodule(name).register_forward_pre_hook(lambda m, i: observer(i[0]))
    with torch.no_grad():
        for a, k in batches:
            ddpm(*a, **k)
    hook.remove()
    scale, zero_point = observer.calculate_qparams()
    assert float(fq.scale) == pytest.approx(float(scale), rel=1e-6)
    assert int(fq.zero_point) == int(zero_point)


def test_collector_runs_a_bf16_unet_in_its_dtype(ddpm, collected):
    """A bf16 UNet is fed bf16 inputs (the scheduler keeps float32 latents): the records follow
    the float32 run within bf16's rounding, and hold no autograd history."""
    half = _collect(copy.deepcopy(ddpm).to(torch.bfloat16))
    assert half.sample.dtype == torch.bfloat16 and not half.sample.requires_grad
    assert not collected.sample.requires_grad
    assert torch.equal(half.timestep, collected.timestep)
    first = collected.step_index == 0  # the initial noise, rounded to bf16
    torch.testing.assert_close(
        half.sample[first].float(), collected.sample[first], atol=0.02, rtol=0.01
    )
    err = (half.sample.float() - collected.sample).abs().max().item()
    assert 0 < err < 0.2
