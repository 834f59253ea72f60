"""Tiny diffusers pipelines built offline (random weights): SDXL, LCM and ControlNet."""

import json

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    LCMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from dmq_fx.graph.unet_configs import TINY_SD, TINY_SDXL, build_unet


def tokenizer(folder) -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)


def text_encoder(hidden: int, projection: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=54,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        projection_dim=projection or hidden,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def vae(latent_channels: int = 4) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


def sdxl(folder) -> StableDiffusionXLPipeline:
    """SDXL base, tiny: two text encoders (16 + 16 = the UNet's 32-wide context, the second's
    16-wide pooled projection), 6 time ids."""
    return StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=text_encoder(16, seed=1),
        text_encoder_2=text_encoder(16, projection=16, seed=2),
        tokenizer=tokenizer(folder),
        tokenizer_2=tokenizer(folder),
        unet=build_unet(TINY_SDXL),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
    )


def _sd(folder, unet, scheduler, **parts):
    return StableDiffusionPipeline(
        vae=vae(),
        text_encoder=text_encoder(TINY_SD["cross_attention_dim"]),
        tokenizer=tokenizer(folder),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **parts,
    )


def lcm(folder) -> StableDiffusionPipeline:
    """An LCM-distilled SD UNet (guidance embedding ``timestep_cond``) with its scheduler."""
    from diffusers import LatentConsistencyModelPipeline

    base = _sd(folder, build_unet(dict(TINY_SD, time_cond_proj_dim=8)), LCMScheduler())
    return LatentConsistencyModelPipeline(**base.components)


def controlnet(folder) -> StableDiffusionControlNetPipeline:
    """SD with a ControlNet made from its UNet (conditioning at latent resolution)."""
    unet = build_unet(TINY_SD)
    torch.manual_seed(3)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,)).eval()
    with torch.no_grad():  # a trained ControlNet's zero convs are no longer zero
        for module in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            module.weight.normal_(0, 0.05)
    base = _sd(folder, unet, DDIMScheduler(steps_offset=1, clip_sample=False))
    return StableDiffusionControlNetPipeline(**base.components, controlnet=net)


def sd2_v(folder) -> StableDiffusionPipeline:
    """SD 2.x: per-level head dims, linear projections, upcast attention, v-prediction."""
    unet = build_unet(
        dict(TINY_SD, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    )
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False, prediction_type="v_prediction")
    return _sd(folder, unet, scheduler)
