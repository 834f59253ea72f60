"""Calibration data from a real diffusers sampler (docs/workflow/calibration_data.md).

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

from dmq_fx.errors import CalibrationError, ConfigError
from dmq_fx.quantize.device import batches_to_device, module_device

__all__ = [
    "CalibrationData",
    "collect_calibration_data",
    "guided_eps",
    "record_pipeline_inputs",
    "select_samples",
    "step_features",
]

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
    #: (N,) int64: the sampler trajectory each row comes from (both guidance halves share it)
    trajectory: torch.Tensor | None = None
    #: further UNet inputs, one row each, by path: ``"timestep_cond"``,
    #: ``"added_cond_kwargs/text_embeds"``, ``"down_block_additional_residuals/#0"`` (``#i``:
    #: the i-th entry of a sequence, rebuilt as a list)
    extra: dict[str, torch.Tensor] | None = None
    #: the classifier-free guidance scale the sampler ran with (1.0: no guidance, or unknown)
    guidance_scale: float = 1.0

    def __len__(self) -> int:
        return self.sample.shape[0]

    @property
    def timesteps(self) -> list[int]:
        """The timestep of each sampling step, noisiest first."""
        steps = sorted(set(self.step_index.tolist()))
        return [int(self.timestep[self.step_index == s][0]) for s in steps]

    def subset(self, index: torch.Tensor) -> CalibrationData:
        """The rows ``index`` (a boolean mask or indices), in that order."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                values[f.name] = {k: v[index] for k, v in value.items()}
            elif f.name == "guidance_scale":
                values[f.name] = value
            else:
                values[f.name] = None if value is None else value[index]
        return CalibrationData(**values)

    def batches(
        self,
        batch_size: int = 32,
        *,
        shuffle: bool = True,
        seed: int = 0,
        guidance_pairs: bool = False,
    ) -> Iterator[tuple[tuple, dict]]:
        """``(args, kwargs)`` batches for :func:`dmq_fx.calibrate`, mixing all timesteps.

        ``guidance_pairs=True`` keeps the two halves of each classifier-free guidance call
        together, laid out as a diffusers pipeline calls the UNet: a batch is ``batch_size // 2``
        unconditional rows, then the conditional rows of the same samples in the same order
        (what a guidance-aware stage, e.g. ``TuneFloatParameters(guidance_scale=...)``, needs).
        """
        if guidance_pairs:
            if batch_size < 2 or batch_size % 2:
                raise ConfigError(
                    f"batches: guidance_pairs needs an even batch_size >= 2, got {batch_size}"
                )
            uncond, cond = self.guidance_pairs()
            order = (
                torch.randperm(len(uncond), generator=torch.Generator().manual_seed(seed))
                if shuffle
                else torch.arange(len(uncond))
            )
            half = batch_size // 2
            for start in range(0, len(order), half):
                pick = order[start : start + half]
                yield self._batch(torch.cat([uncond[pick], cond[pick]]))
            return
        n = len(self)
        order = (
            torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            if shuffle
            else torch.arange(n)
        )
        for start in range(0, n, batch_size):
            yield self._batch(order[start : start + batch_size])

    def _batch(self, idx: torch.Tensor) -> tuple[tuple, dict]:
        kwargs: dict[str, Any] = {}
        if self.encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = self.encoder_hidden_states[idx]
        if self.class_labels is not None:
            kwargs["class_labels"] = self.class_labels[idx]
        for path, value in (self.extra or {}).items():
            _set_path(kwargs, path.split("/"), value[idx])
        return (self.sample[idx], self.timestep[idx]), kwargs

    def guidance_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The row indices ``(unconditional, conditional)`` of each guidance pair (the two halves
        of one guided UNet call: the same trajectory and step), in row order of the
        unconditional half. Raises CalibrationError when the data holds no guidance halves or a
        half has no partner."""
        if self.unconditional is None or self.trajectory is None:
            raise CalibrationError(
                "guidance pairs: this calibration data has no classifier-free guidance halves "
                "(record it with guidance_scale > 1, or from a pipeline that uses guidance)"
            )
        key = self.trajectory * (int(self.step_index.max()) + 1) + self.step_index
        uncond = torch.nonzero(self.unconditional).flatten()
        cond_rows = torch.nonzero(~self.unconditional).flatten()
        by_key = {int(key[i]): int(i) for i in cond_rows}
        partners = [by_key.get(int(key[i])) for i in uncond]
        unpaired = [int(i) for i, c in zip(uncond, partners) if c is None]
        unpaired += sorted(set(cond_rows.tolist()) - set(partners))
        if unpaired:
            raise CalibrationError(
                f"guidance pairs: {len(uncond)} unconditional and {len(cond_rows)} conditional "
                f"rows do not pair one to one by trajectory and step (first unpaired row: "
                f"{unpaired[0]})"
            )
        cond = torch.tensor(partners, dtype=torch.long)
        return uncond, cond

    def save(self, path: str | Path) -> None:
        tensors = {
            f.name: getattr(self, f.name).contiguous()
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        tensors.update({f"extra/{k}": v.contiguous() for k, v in (self.extra or {}).items()})
        metadata = {"format": FORMAT, "guidance_scale": repr(float(self.guidance_scale))}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationData:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        fmt = metadata.get("format")
        if fmt != FORMAT:
            raise CalibrationError(
                f"{path}: not a dmq_fx calibration file (format {fmt!r}, expected {FORMAT!r})"
            )
        tensors = load_file(str(path))
        extra = {k[len("extra/") :]: v for k, v in tensors.items() if k.startswith("extra/")}
        tensors = {k: v for k, v in tensors.items() if not k.startswith("extra/")}
        # files written before the scale was recorded: 1.0 (their guidance halves still pair)
        scale = float(metadata.get("guidance_scale", 1.0))
        return cls(**tensors, extra=extra or None, guidance_scale=scale)


def _set_path(out: dict, parts: list[str], value: torch.Tensor) -> None:
    """Put ``value`` at ``parts`` of the nested kwargs ``out`` (``#i``: a list index)."""
    container: Any = out
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        key: Any = int(part[1:]) if part.startswith("#") else part
        if isinstance(container, list):
            while len(container) <= key:
                container.append(None)
        if last:
            container[key] = value
            return
        following = [] if parts[i + 1].startswith("#") else {}
        if isinstance(container, list):
            if container[key] is None:
                container[key] = following
        else:
            container.setdefault(key, following)
        container = container[key]


def _flat_rows(value: Any, rows: int, path: str, out: dict[str, torch.Tensor]) -> None:
    """Record a UNet input's tensors with ``rows`` rows under their paths (``_set_path``)."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != rows:
            raise CalibrationError(
                f"UNet input '{path}' has shape {tuple(value.shape)}: dmq_fx records inputs with "
                f"one row per sample ({rows} in this call)"
            )
        out[path] = value.detach().cpu()
    elif isinstance(value, dict):
        for k, v in value.items():
            _flat_rows(v, rows, f"{path}/{k}", out)
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _flat_rows(v, rows, f"{path}/#{i}", out)
    else:
        raise CalibrationError(
            f"UNet input '{path}' is a {type(value).__name__} ({value!r}); dmq_fx records tensor "
            "inputs (in dicts, tuples and lists) only"
        )


def record_pipeline_inputs(
    pipe: Any, *call_args: Any, seed: int = 0, progress: bool = True, **call_kwargs: Any
) -> CalibrationData:
    """Run ``pipe(*call_args, **call_kwargs)`` once and record every UNet call's inputs.

    Works for any diffusers pipeline that calls ``pipe.unet`` once per step: the pipeline's own
    prompt encoding, SDXL's added text and time embeddings, LCM's guidance embedding, a
    ControlNet's residuals (the ControlNet runs in float, its outputs become UNet inputs) and both
    halves of classifier-free guidance (rows of the unconditional half are marked, from the
    pipeline's ``do_classifier_free_guidance``). ``seed`` seeds the pipeline's generator;
    ``output_type="latent"`` is used unless given (decoding is not needed). The pipeline is not
    modified (a hook on its UNet, removed afterwards).
    """
    unet = pipe.unet
    records: list[dict[str, Any]] = []
    bar = tqdm(desc="record UNet inputs", unit="call", disable=not progress)

    names = list(inspect.signature(unet.forward).parameters)

    def hook(module, args, kwargs):
        bound = dict(zip(names, args), **kwargs)
        sample = bound.pop("sample")
        rows = sample.shape[0]
        timestep = torch.as_tensor(bound.pop("timestep")).reshape(-1).expand(rows)
        bound.pop("return_dict", None)
        flat: dict[str, torch.Tensor] = {}
        for name, value in bound.items():
            _flat_rows(value, rows, name, flat)
        guided = bool(getattr(pipe, "do_classifier_free_guidance", False)) and rows % 2 == 0
        scale = float(getattr(pipe, "guidance_scale", 1.0)) if guided else 1.0
        records.append({"sample": sample.detach().cpu(), "timestep": timestep, "flat": flat,
                        "guided": guided, "scale": scale})  # fmt: skip
        bar.update(1)

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            call_kwargs.setdefault("output_type", "latent")
            pipe(*call_args, generator=torch.Generator().manual_seed(seed), **call_kwargs)
    finally:
        handle.remove()
        bar.close()
    if not records:
        raise CalibrationError(f"{type(pipe).__name__} never called its UNet")
    keys = list(records[0]["flat"])
    if any(list(r["flat"]) != keys for r in records):
        raise CalibrationError("the UNet's inputs changed between steps; record them separately")
    rows = [r["sample"].shape[0] for r in records]
    unconditional = torch.cat(
        [torch.arange(n) < (n // 2 if r["guided"] else 0) for n, r in zip(rows, records)]
    )
    trajectory = torch.cat(
        [
            torch.arange(n) % (n // 2) if r["guided"] else torch.arange(n)
            for n, r in zip(rows, records)
        ]
    )
    extra = {k: torch.cat([r["flat"][k] for r in records]) for k in keys}
    ehs = extra.pop("encoder_hidden_states", None)
    labels = extra.pop("class_labels", None)
    return CalibrationData(
        sample=torch.cat([r["sample"] for r in records]),
        timestep=torch.cat([r["timestep"] for r in records]).long(),
        step_index=torch.cat([torch.full((n,), i) for i, n in enumerate(rows)]),
        encoder_hidden_states=ehs,
        class_labels=labels,
        unconditional=unconditional,
        trajectory=trajectory,
        extra=extra or None,
        guidance_scale=max(r["scale"] for r in records),
    )


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


@torch.no_grad()
def guided_eps(
    unet: Any,
    x: torch.Tensor,
    t: torch.Tensor,
    *,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The noise prediction a sampler step uses: unconditional, text-conditional, or
    classifier-free guided (both halves in one batch, unconditional first; ``t`` a 0-d or
    per-sample timestep)."""
    if prompt_embeds is None:
        return unet(x, t).sample
    if guidance_scale <= 1.0:
        return unet(x, t, encoder_hidden_states=prompt_embeds).sample
    n = x.shape[0]
    context = torch.cat([negative_prompt_embeds.expand(n, -1, -1), prompt_embeds])
    both = torch.cat([t, t]) if t.dim() > 0 else t
    eps_u, eps_c = unet(torch.cat([x, x]), both, encoder_hidden_states=context).sample.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


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
    """Record the UNet inputs of a sampler run at every step (docs/workflow/calibration_data.md).

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

    The sampler runs on the UNet's device in the UNet's dtype (noise and labels are drawn on
    the CPU from the seed, so every device records the same trajectories up to its rounding;
    the scheduler's arithmetic stays float32); the records come back to the CPU.
    """
    config = getattr(unet, "config", None)
    built_by_pipeline = [
        name
        for name in ("addition_embed_type", "time_cond_proj_dim", "encoder_hid_dim_type")
        if getattr(config, name, None) is not None
    ]
    if built_by_pipeline:
        raise CalibrationError(
            f"this UNet takes inputs its pipeline builds ({', '.join(built_by_pipeline)}: SDXL "
            "time ids, LCM guidance embeddings, image embeddings); record them from the "
            "pipeline's own call: dmq_fx.calibration.record_pipeline_inputs(pipe, prompts)"
        )
    if samples_per_step < 1 or num_inference_steps < 1:
        raise ConfigError("samples_per_step and num_inference_steps must be at least 1")
    guided = guidance_scale > 1.0
    if guided and (prompt_embeds is None or negative_prompt_embeds is None):
        raise ConfigError("guidance_scale > 1 needs prompt_embeds and negative_prompt_embeds")
    unet = copy.deepcopy(unet).eval()
    device = module_device(unet)
    dtype = next(unet.parameters()).dtype
    if prompt_embeds is not None:
        prompt_embeds = prompt_embeds.to(device, dtype)
    if negative_prompt_embeds is not None:
        negative_prompt_embeds = negative_prompt_embeds.to(device, dtype)
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
            x = (torch.randn(n, *shape, generator=g) * sched.init_noise_sigma).to(device)
            cond: dict[str, torch.Tensor] = {}
            if prompt_embeds is not None:
                idx = (torch.arange(start, start + n) + k) % prompt_embeds.shape[0]
                cond["encoder_hidden_states"] = prompt_embeds[idx.to(device)]
            if num_class_labels:
                labels = torch.randint(0, num_class_labels, (n,), generator=g)
                cond["class_labels"] = labels.to(device)
            for j, t in enumerate(sched.timesteps[: k + 1]):
                # the UNet computes in its dtype; the scheduler keeps float32 latents
                model_in = sched.scale_model_input(x, t).to(dtype)
                t_batch = torch.full((n,), int(t), dtype=torch.long, device=device)
                if guided:
                    eps = guided_eps(
                        unet,
                        model_in,
                        t_batch,
                        prompt_embeds=cond["encoder_hidden_states"],
                        negative_prompt_embeds=negative_prompt_embeds,
                        guidance_scale=guidance_scale,
                    )
                else:
                    eps = unet(model_in, t_batch, **cond).sample
                eps = eps.float()
                if j == k or not independent_trajectories:  # a group records its last step
                    first = start + (k * samples_per_step if independent_trajectories else 0)
                    rec = {
                        "sample": model_in.clone(),
                        "timestep": t_batch,
                        "step_index": torch.full((n,), j, dtype=torch.long, device=device),
                        "trajectory": torch.arange(first, first + n, device=device),
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
                        rec["unconditional"] = torch.arange(2 * n, device=device) < n
                    records.append({key: v.cpu() for key, v in rec.items()})
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
    return CalibrationData(
        **{key: v[order] for key, v in merged.items()},
        guidance_scale=float(guidance_scale) if guided else 1.0,
    )


@torch.no_grad()
def step_features(
    unet: torch.nn.Module,
    pool: CalibrationData,
    feature_samples: int | None = 256,
    *,
    progress: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """TDAC's per-step features of ``pool`` (every step of the same trajectories, as
    ``collect_calibration_data(..., independent_trajectories=False)`` records them): per step,
    its row indices ordered by trajectory (unconditional half first) and the input of the
    UNet's middle attention block (:func:`dmq_fx.methods.tdac.mid_attention_input`) over the first
    ``feature_samples`` trajectories."""
    from dmq_fx.graph.tracing import trace
    from dmq_fx.graph.units import capture_unit_inputs
    from dmq_fx.methods.tdac import mid_attention_input

    if pool.trajectory is None:
        raise CalibrationError("step_features needs data recorded with trajectory ids")
    trajectories = len(set(pool.trajectory.tolist()))
    rows = []
    for k in sorted(set(pool.step_index.tolist())):
        idx = torch.nonzero(pool.step_index == k).flatten()
        half = pool.unconditional[idx].long() if pool.unconditional is not None else 0
        key = pool.trajectory[idx] * 2 + (1 - half)
        rows.append(idx[torch.argsort(key)])
    args, kwargs = next(pool.subset(rows[0][:2]).batches(2, shuffle=False))
    device = module_device(unet)
    gm = trace(unet, *batches_to_device([(args, kwargs)], device)[0], check=False)
    node = mid_attention_input(gm)
    features = []
    for idx in tqdm(rows, desc="TDAC features", disable=not progress):
        per = len(idx) // trajectories  # rows per trajectory: 2 under guidance
        keep = idx if feature_samples is None else idx[: feature_samples * per]
        batches = batches_to_device(list(pool.subset(keep).batches(64, shuffle=False)), device)
        features.append(capture_unit_inputs(gm, [node], batches, None).values[0].cpu())
    return rows, features


@torch.no_grad()
def select_samples(
    unet: torch.nn.Module,
    scheduler: Any = None,
    n: int = 256,
    *,
    radius: float = 3.0,
    lam: float = 1.0,
    min_per_step: int = 0,
    num_inference_steps: int = 20,
    feature_samples: int | None = 256,
    seed: int = 0,
    progress: bool = True,
    pool: CalibrationData | None = None,
    **sampler_kwargs: Any,
) -> CalibrationData:
    """EDA-DM's calibration set (TDAC, docs/methods/eda_dm.md): ``n`` samples spread over the
    sampling steps
    by density and diversity.

    The float UNet generates ``n`` trajectories with the sampler
    (:func:`collect_calibration_data` with ``independent_trajectories=False``; guidance,
    prompts, eta as there, through ``sampler_kwargs``). At every step the input of the UNet's
    middle attention block (:func:`dmq_fx.methods.tdac.mid_attention_input`, found on the traced
    graph) over the first ``feature_samples`` trajectories is that step's feature; step ``k``
    gets ``w_k = D̂_k + lam * V̂_k`` (:func:`dmq_fx.methods.tdac.tdac_weights`, ``radius`` the density
    radius: 3.0 for pixel-space models, 0.3 for latent ones in EDA-DM) and receives
    :func:`dmq_fx.methods.tdac.allocate_samples` of the ``n`` samples (at least ``min_per_step``:
    DMQ's per-step stages need every step), each from a different trajectory (a seeded
    permutation). Under guidance a sample is both halves. Returns the selected rows, noisiest
    step first.

    ``pool``: select from these recorded trajectories instead (e.g.
    :func:`record_pipeline_inputs` of an SDXL or ControlNet pipeline, whose UNet inputs dmq_fx's
    sampler cannot build); ``n`` is then at most their number.
    """
    from dmq_fx.methods.tdac import allocate_samples, tdac_weights

    if n < 1:
        raise ConfigError(f"select_samples: n must be >= 1, got {n}")
    if feature_samples is not None and feature_samples < 1:
        raise ConfigError(f"select_samples: feature_samples must be >= 1, got {feature_samples}")
    if pool is None:
        pool = collect_calibration_data(
            unet,
            scheduler,
            num_inference_steps=num_inference_steps,
            samples_per_step=n,
            independent_trajectories=False,
            seed=seed,
            progress=progress,
            **sampler_kwargs,
        )
    elif sampler_kwargs:
        raise ConfigError(
            f"select_samples: sampler arguments {sorted(sampler_kwargs)} do not apply to a pool"
        )
    elif pool.trajectory is None or n > len(set(pool.trajectory.tolist())):
        trajectories = 0 if pool.trajectory is None else len(set(pool.trajectory.tolist()))
        raise ConfigError(
            f"select_samples: n={n} samples from a pool of {trajectories} trajectories (each "
            "step gives at most one sample per trajectory)"
        )
    rows, features = step_features(unet, pool, feature_samples, progress=progress)
    scores = tdac_weights(features, radius, lam)
    counts = allocate_samples(scores.weights, n, min_per_step)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    chosen, start = [], 0
    for k_idx, count in zip(rows, counts.tolist()):
        picked = set(order[start : start + count].tolist())
        start += count
        chosen.append(k_idx[torch.tensor([int(t) in picked for t in pool.trajectory[k_idx]])])
    return pool.subset(torch.cat(chosen))
