"""What the reference diffusion models' training scripts share: the epsilon-prediction training
loop (AdamW with a 200-step linear warm-up, gradient norm clipped at 1, EMA weights) and the
files a trained model is committed as."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

EMA_DECAY = 0.999


def train_eps(
    unet: torch.nn.Module,
    scheduler_config: dict,
    draw_batch: Callable[[], tuple[torch.Tensor, dict]],
    *,
    steps: int,
    lr: float,
    desc: str,
) -> tuple[list[float], float]:
    """Train ``unet`` to predict the noise DDPM adds; ends with the EMA weights in ``unet``.

    ``draw_batch()`` gives one batch of clean images and the UNet's extra keyword arguments
    (e.g. ``encoder_hidden_states``); noise and timesteps are drawn here, after it, from torch's
    global generator. Returns the loss per step and the seconds it took."""
    ema = EMAModel(unet.parameters(), decay=EMA_DECAY, use_ema_warmup=True, power=0.75)
    scheduler = DDPMScheduler(**scheduler_config)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    losses, start = [], time.time()
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        x0, kwargs = draw_batch()
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler_config["num_train_timesteps"], (len(x0),))
        pred = unet(scheduler.add_noise(x0, noise, t), t, **kwargs).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        warmup.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    ema.copy_to(unet.parameters())
    unet.eval()
    return losses, time.time() - start


def save_trained(
    unet,
    out: Path,
    scheduler_config: dict,
    args,
    losses: list[float],
    seconds: float,
    **record,
) -> None:
    """``unet`` with diffusers' ``save_pretrained`` (config.json + safetensors), the scheduler
    config, and ``training.json``: the exact command, ``args``' seed, steps, batch, lr and
    threads, ``record``'s extra fields, the time and the loss per 100 steps."""
    unet.save_pretrained(out)
    DDPMScheduler(**scheduler_config).save_config(out / "scheduler")
    (out / "training.json").write_text(
        json.dumps(
            {
                "command": " ".join([Path(sys.executable).name] + sys.argv),
                "seed": args.seed,
                "steps": args.steps,
                "batch": args.batch,
                "lr": args.lr,
                "threads": args.threads,
                "ema_decay": EMA_DECAY,
                "torch": torch.__version__,
                "parameters": sum(p.numel() for p in unet.parameters()),
                **record,
                "train_seconds": round(seconds),
                "loss_per_100_steps": [
                    round(float(np.mean(losses[i : i + 100])), 5)
                    for i in range(0, len(losses), 100)
                ],
            },
            indent=1,
        )
    )
