"""diffusers UNet configurations used by tests, examples and benchmarks (random weights, offline).

The full-size configs are the published ones (DDPM-CIFAR10 ``google/ddpm-cifar10-32``, Stable
Diffusion 1.5 ``unet/config.json``); the tiny variants keep every block type of their parent.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

DDPM_CIFAR10: dict[str, Any] = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)

TINY_DDPM: dict[str, Any] = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(16, 32, 32),
    norm_num_groups=8,
    attention_head_dim=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)

#: The quick start's UNet: 32x32, attention at 16x16, about 4.4M parameters.
SMALL_DDPM: dict[str, Any] = dict(
    TINY_DDPM,
    sample_size=32,
    block_out_channels=(64, 128, 128),
    attention_head_dim=32,
    norm_num_groups=32,
)

TINY_CLASS_CONDITIONAL: dict[str, Any] = dict(
    TINY_DDPM,
    num_class_embeds=10,
    resnet_time_scale_shift="scale_shift",
)

SD15: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)

TINY_SD: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    cross_attention_dim=24,
    attention_head_dim=4,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


#: SDXL's structure, tiny: text-and-time added embeddings (``added_cond_kwargs`` with
#: ``text_embeds`` and 6 ``time_ids``), linear projections, 2 transformer layers at the second
#: level, per-level head dims.
TINY_SDXL: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,  # pooled text (16) + 6 time ids x 8
)


def build_unet(config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A UNet2DConditionModel (if ``cross_attention_dim`` is set) or UNet2DModel, seeded."""
    torch.manual_seed(seed)
    cls = UNet2DConditionModel if "cross_attention_dim" in config else UNet2DModel
    return cls(**config).eval()


def example_inputs(
    model: torch.nn.Module, batch: int = 2, seed: int = 0, seq_len: int = 7
) -> tuple[tuple, dict]:
    """(args, kwargs) of one forward call of ``model`` with random data."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    sample = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    timestep = torch.randint(0, 1000, (batch,), generator=g)
    kwargs: dict[str, Any] = {}
    if isinstance(model, UNet2DConditionModel):
        kwargs["encoder_hidden_states"] = torch.randn(
            batch, seq_len, cfg.cross_attention_dim, generator=g
        )
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            # original size, crop corner, target size, as SDXL pipelines build them
            "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).repeat(batch, 1),
        }
    if getattr(cfg, "num_class_embeds", None):
        kwargs["class_labels"] = torch.randint(0, cfg.num_class_embeds, (batch,), generator=g)
    elif getattr(cfg, "class_embed_type", None) == "timestep":
        kwargs["class_labels"] = torch.randint(0, 1000, (batch,), generator=g)
    return (sample, timestep), kwargs
