"""Calibration data from a real diffusers sampler (SPEC 1.5).

:func:`collect_calibration_data` runs a scheduler (DDIM, 20 steps, eta 1 by default) with the
float UNet and records the UNet's inputs (x_t, t and the conditioning, both halves under
classifier-free guidance) at every sampling step. The result feeds :func:`dmq_fx.calibrate`
through :meth:`CalibrationData.batches` and saves / loads as safetensors.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .errors import CalibrationError, ConfigError

__all__ = ["CalibrationData", "collect_calibration_data"]

FORMAT = "dmq_fx.calibration/1"


@dataclass
class CalibrationData:
    """Recorded UNet inputs, one row per UNet call input (guidance halves are separate rows)."""

    sample: torch.Tensor  #: (N, C, H, W) the UNet's input x_t (scaled by the scheduler)
    timestep: torch.Tensor  #: (N,) int64
    step_index: torch.Tensor  #: (N,) index of the sampling step, 0 = the noisiest
    encoder_hidden_states: torch.Tensor | None = None  #: (N, S, D) text context
    class_labels: torch.Tensor | None = None  #: (N,)
    #: (N,) bool: True for the unconditional half under classifier-free guidance
    unconditional: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.sample.shape[0]

    @property
    def timesteps(self) -> list[int]:
        """The timestep of each sampling step, noisiest first."""
        steps = sorted(set(self.step_index.tolist()))
        return [int(self.timestep[self.step_index == s][0]) for s in steps]

    def batches(
        self, batch_size: int = 32, *, shuffle: bool = True, seed: int = 0
    ) -> Iterator[tuple[tuple, dict]]:
        """``(args, kwargs)`` batches for :func:`dmq_fx.calibrate`, mixing all timesteps."""
        n = len(self)
        order = (
            torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            if shuffle
            else torch.arange(n)
        )
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            kwargs: dict[str, Any] = {}
            if self.encoder_hidden_states is not None:
                kwargs["encoder_hidden_states"] = self.encoder_hidden_states[idx]
            if self.class_labels is not None:
                kwargs["class_labels"] = self.class_labels[idx]
            yield (self.sample[idx], self.timestep[idx]), kwargs

    def save(self, path: str | Path) -> None:
        tensors = {
            f.name: getattr(self, f.name).contiguous()
            for f in fields(self)
            if getattr(self, f.name) is not None
        }
        save_file(tensors, str(path), metadata={"format": FORMAT})

    @classmethod
    def load(cls, path: str | Path) -> CalibrationData:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            fmt = (f.metadata() or {}).get("format")
        if fmt != FORMAT:
            raise CalibrationError(
                f"{path}: not a dmq_fx calibration file (format {fmt!r}, expected {FORMAT!r})"
            )
        tensors = load_file(str(path))
        return cls(**tensors)


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


@torch.no_grad()
def collect_calibration_data(
    unet: torch.nn.Module,
    scheduler: Any = None,
    *,
    num_inference_steps: int = 20,
    samples_per_step: int = 256,
    eta: float = 1.0,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    num_class_labels: int | None = None,
    independent_trajectories: bool = True,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> CalibrationData:
    """Record the UNet inputs of a sampler run at every step (SPEC 1.5).

    Args:
        unet: the float UNet (not modified; run in eval mode on a copy).
        scheduler: a diffusers scheduler with ``set_timesteps`` / ``step`` (copied, not
            modified); default ``DDIMScheduler()``. Pass the one the model was trained with,
            e.g. ``DDIMScheduler.from_config(pipe.scheduler.config)``.
        num_inference_steps: sampling steps (20 in DMQ).
        samples_per_step: trajectories recorded per step (256 in DMQ).
        eta: DDIM's eta (1.0 in DMQ); passed only to schedulers that take it.
        prompt_embeds: (P, S, D) text contexts; trajectory ``i`` uses prompt ``i % P``.
        negative_prompt_embeds: (1, S, D) unconditional context for guidance.
        guidance_scale: > 1 runs classifier-free guidance and records both halves.
        num_class_labels: for class-conditional UNets, labels are drawn uniformly.
        independent_trajectories: as in DMQ's code, step ``k``'s samples come from fresh
            trajectories run up to step ``k`` (``k + 1`` UNet calls per sample); if False one set
            of trajectories provides every step (cheaper, correlated across steps).
        seed: everything random derives from it.
    """
    if samples_per_step < 1 or num_inference_steps < 1:
        raise ConfigError("samples_per_step and num_inference_steps must be at least 1")
    guided = guidance_scale > 1.0
    if guided and (prompt_embeds is None or negative_prompt_embeds is None):
        raise ConfigError("guidance_scale > 1 needs prompt_embeds and negative_prompt_embeds")
    unet = copy.deepcopy(unet).eval()
    scheduler = copy.deepcopy(scheduler) if scheduler is not None else DDIMScheduler()
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    shape = (cfg.in_channels, size, size)
    records: list[dict[str, torch.Tensor]] = []
    groups = range(num_inference_steps) if independent_trajectories else [num_inference_steps - 1]
    total = sum(k + 1 for k in groups) * samples_per_step
    bar = tqdm(
        total=total, desc="collect calibration data", unit="sample-step", disable=not progress
    )
    for k in groups:
        for start in range(0, samples_per_step, batch_size):
            n = min(batch_size, samples_per_step - start)
            g = torch.Generator().manual_seed(seed * 1_000_003 + k * 10_007 + start)
            sched = copy.deepcopy(scheduler)
            sched.set_timesteps(num_inference_steps)
            x = torch.randn(n, *shape, generator=g) * sched.init_noise_sigma
            cond: dict[str, torch.Tensor] = {}
            if prompt_embeds is not None:
                idx = (torch.arange(start, start + n) + k) % prompt_embeds.shape[0]
                cond["encoder_hidden_states"] = prompt_embeds[idx]
            if num_class_labels:
                cond["class_labels"] = torch.randint(0, num_class_labels, (n,), generator=g)
            for j, t in enumerate(sched.timesteps[: k + 1]):
                model_in = sched.scale_model_input(x, t)
                t_batch = torch.full((n,), int(t), dtype=torch.long)
                if guided:
                    uncond = negative_prompt_embeds.expand(n, -1, -1)
                    eps_u, eps_c = unet(
                        torch.cat([model_in, model_in]),
                        torch.cat([t_batch, t_batch]),
                        encoder_hidden_states=torch.cat([uncond, cond["encoder_hidden_states"]]),
                    ).sample.chunk(2)
                    eps = eps_u + guidance_scale * (eps_c - eps_u)
                else:
                    eps = unet(model_in, t_batch, **cond).sample
                if j == k or not independent_trajectories:  # a group records its last step
                    rec = {
                        "sample": model_in.clone(),
                        "timestep": t_batch,
                        "step_index": torch.full((n,), j, dtype=torch.long),
                        **cond,
                    }
                    if guided:
                        rec = {key: torch.cat([v, v]) for key, v in rec.items()}
                        rec["encoder_hidden_states"] = torch.cat(
                            [
                                negative_prompt_embeds.expand(n, -1, -1),
                                cond["encoder_hidden_states"],
                            ]
                        )
                        rec["unconditional"] = torch.arange(2 * n) < n
                    records.append(rec)
                step_kwargs = {}
                if _accepts(sched.step, "eta"):
                    step_kwargs["eta"] = eta
                if _accepts(sched.step, "generator"):
                    step_kwargs["generator"] = g
                x = sched.step(eps, t, x, **step_kwargs).prev_sample
                bar.update(n)
    bar.close()
    merged = {key: torch.cat([r[key] for r in records]) for key in records[0]}
    order = torch.argsort(merged["step_index"], stable=True)
    return CalibrationData(**{key: v[order] for key, v in merged.items()})
