import numpy as np
import pytest
import tiny_pipelines
import torch
from conftest import assert_unchanged, state_snapshot
from diffusers import DDIMScheduler, DDPMPipeline, StableDiffusionPipeline

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet
from dmq_fx.lowering.quantized_modules import QuantizedLayer

FAST = {"num_inference_steps": 4, "samples_per_step": 4, "batch_size": 8}


def _quantized_layers(pipe):
    return [m for m in pipe.unet.graph.modules() if isinstance(m, QuantizedLayer)]


def _generate(pipe) -> np.ndarray:
    """Two images, 4 steps, seed 0, as numpy in [0, 1]."""
    generator = torch.Generator().manual_seed(0)
    images = pipe(batch_size=2, num_inference_steps=4, generator=generator, output_type="np")
    return np.asarray(images.images)


def test_ddpm_pipeline_generates_with_the_quantized_unet():
    unet = build_unet(TINY_DDPM)
    pipe = DDPMPipeline(unet=unet, scheduler=DDIMScheduler(beta_schedule="squaredcos_cap_v2"))
    snapshot = state_snapshot(unet)
    q = dmq_fx.quantize_pipeline(pipe, {"preset": "minmax", "act_bits": 8, **FAST}, progress=False)
    assert_unchanged(unet, snapshot)
    assert pipe.unet is unet and type(q) is DDPMPipeline
    assert isinstance(q.unet, dmq_fx.QuantizedUNet) and _quantized_layers(q)
    assert q.scheduler is not pipe.scheduler
    out = {"fp": _generate(pipe), "q": _generate(q)}
    assert out["q"].shape == out["fp"].shape == (2, 16, 16, 3)
    diff = np.abs(out["q"] - out["fp"])
    assert 0 < diff.mean() < 0.05  # quantized, and still the same images (range [0, 1])
    rows = dmq_fx.summary(q.unet.graph).rows
    forms = {n: m.form for n, m in q.unet.graph.named_modules() if isinstance(m, QuantizedLayer)}
    assert sorted(r["form"] for r in rows) == sorted(forms.values()) and len(rows) == len(forms)
    # deterministic: the same config and seed give the same quantized pipeline and images
    again = dmq_fx.quantize_pipeline(
        pipe, {"preset": "minmax", "act_bits": 8, **FAST}, progress=False
    )
    assert np.array_equal(_generate(again), out["q"])


@pytest.mark.slow
def test_ddpm_pipeline_with_a_compiled_unet_generates_the_eager_images():
    torch._dynamo.reset()
    pipe = DDPMPipeline(
        unet=build_unet(TINY_DDPM), scheduler=DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    )
    config = {"preset": "minmax", "act_bits": 8, **FAST}
    eager = dmq_fx.quantize_pipeline(pipe, config, progress=False)
    compiled = dmq_fx.quantize_pipeline(pipe, {**config, "compile": True}, progress=False)
    assert compiled.unet.compiled is not None and eager.unet.compiled is None
    fp, q, qc = _generate(pipe), _generate(eager), _generate(compiled)
    # the compiled UNet's images sit far closer to the eager quantized ones than to float
    assert np.abs(qc - q).mean() < 0.25 * np.abs(q - fp).mean()


def _tiny_stable_diffusion(tmp_path):
    return tiny_pipelines._sd(
        tmp_path, build_unet(TINY_SD), DDIMScheduler(steps_offset=1, clip_sample=False)
    )


def test_text_pipeline_calibrates_both_guidance_halves_and_generates(tmp_path):
    pipe = _tiny_stable_diffusion(tmp_path)
    calibration = {"prompts": ["a cat", "a dog"], "guidance_scale": 4.0}
    q = dmq_fx.quantize_pipeline(
        pipe, {"preset": "minmax", **FAST}, calibration=calibration, progress=False
    )
    assert type(q) is StableDiffusionPipeline and q.text_encoder is pipe.text_encoder
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, output_type="np", height=16, width=16)
    fp = pipe("a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
    qi = q("a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert qi.shape == fp.shape and 0 < np.abs(qi - fp).mean() < 0.1


def test_a_guided_calibration_tunes_the_guided_prediction(tmp_path, monkeypatch):
    """A preset ending in tune_float_params, on data sampled with guidance: that stage gets the
    sampler's guidance scale and batches of guidance pairs; the stages before it do not."""
    from dmq_fx.methods.float_tuning import TuneFloatParameters
    from dmq_fx.methods.presets import Preset
    from dmq_fx.workflow import pipeline

    seen = []

    def record(self, gm, ctx):
        (x, t), kwargs = ctx.batches[0]
        seen.append((self.guidance_scale, torch.equal(*x.chunk(2)), len(ctx.batches)))

    monkeypatch.setattr(TuneFloatParameters, "__call__", record)
    cheap = Preset("minmax+tuning", ("observe_activations", "observe_weights",
                                     "tune_float_params"), {}, "")  # fmt: skip
    monkeypatch.setattr(pipeline, "PRESETS", {**pipeline.PRESETS, cheap.name: cheap})
    monkeypatch.setattr(pipeline, "PREPARE_FLAGS", {**pipeline.PREPARE_FLAGS, cheap.name: {}})
    pipe = _tiny_stable_diffusion(tmp_path)
    config = {"preset": "minmax+tuning", **FAST}
    calibration = {"prompts": ["a cat", "a dog"], "guidance_scale": 4.0}
    q = dmq_fx.quantize_pipeline(pipe, config, calibration=calibration, progress=False)
    # 4 steps x 4 samples x 2 halves in batches of 8 rows: 4 pair batches
    assert seen == [(4.0, True, 4)] and q.unet is not pipe.unet
    seen.clear()
    unguided = {"prompts": ["a cat", "a dog"], "guidance_scale": 1.0}
    dmq_fx.quantize_pipeline(pipe, config, calibration=unguided, progress=False)
    assert seen == [(1.0, False, 2)]


def test_bad_configs_are_named():
    pipe = DDPMPipeline(unet=build_unet(TINY_DDPM), scheduler=DDIMScheduler())
    with pytest.raises(dmq_fx.ConfigError, match="unknown preset 'dmq2'"):
        dmq_fx.quantize_pipeline(pipe, "dmq2")
    with pytest.raises(dmq_fx.ConfigError, match="weight_bits"):
        dmq_fx.quantize_pipeline(pipe, {"weight_bits": 9})
    with pytest.raises(dmq_fx.ConfigError, match="unknown QuantizationConfig fields"):
        dmq_fx.quantize_pipeline(pipe, {"bits": 4})
    with pytest.raises(dmq_fx.ConfigError, match="no encode_prompt"):
        dmq_fx.quantize_pipeline(pipe, {**FAST, "preset": "minmax"}, calibration={"prompts": ["x"]})
