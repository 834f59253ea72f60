"""Train the ``fashion28`` reference DDPM: an unconditional diffusers UNet2DModel on Fashion-MNIST.

    python benchmarks/models/train_fashion28.py [--steps 3000] [--out benchmarks/models/fashion28]

Runs once, offline, on one CPU thread (about 75 minutes on this project's machine); CI never
trains. Writes the EMA weights with diffusers' ``save_pretrained`` (config.json + safetensors),
the scheduler config, ``training.json`` (seed, steps, losses, the exact command) and
``docs/fashion28_samples.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel
from dmq_fx_bench.datasets import load_fashion_mnist
from PIL import Image
from training import save_trained, train_eps

CONFIG = dict(
    sample_size=28,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    norm_num_groups=16,
    attention_head_dim=16,
    # attention at the 7x7 level only: at 14x14 its backward doubled the step time on this CPU
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
)


@torch.no_grad()
def sample_grid(unet: UNet2DModel, path: Path, n: int = 64, steps: int = 20, seed: int = 0):
    """An 8x8 grid of 20-step DDIM (eta 1) samples."""
    scheduler = DDIMScheduler(**SCHEDULER)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    for t in scheduler.timesteps:
        eps = unet(x, t).sample
        x = scheduler.step(eps, t, x, eta=1.0, generator=g).prev_sample
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).numpy()
    side = int(np.sqrt(n))
    grid = img.reshape(side, side, 28, 28).transpose(0, 2, 1, 3).reshape(side * 28, side * 28)
    Image.fromarray(grid).resize((side * 56, side * 56), Image.NEAREST).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/models/fashion28")
    ap.add_argument("--samples", default="docs/fashion28_samples.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images, _ = load_fashion_mnist("train")
    data = torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)

    unet = UNet2DModel(**CONFIG)

    def draw_batch():
        return data[torch.from_numpy(rng.integers(0, len(data), args.batch))], {}

    losses, seconds = train_eps(
        unet, SCHEDULER, draw_batch, steps=args.steps, lr=args.lr, desc="train fashion28"
    )
    out = Path(args.out)
    save_trained(unet, out, SCHEDULER, args, losses, seconds)
    Path(args.samples).parent.mkdir(parents=True, exist_ok=True)
    sample_grid(unet, Path(args.samples))
    print(f"saved {out} and {args.samples}")


if __name__ == "__main__":
    main()
