"""What identifies a float model: its diffusers config and a digest of its weights."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

__all__ = ["model_config", "unet_paths", "weights_fingerprint"]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A digest of the model's parameters and buffers: names, shapes, dtypes and per-tensor
    sums and sums of squares (float64). Not cryptographic: it tells checkpoints apart without
    hashing every byte of a large UNet."""
    h = hashlib.sha256()
    with torch.no_grad():
        for key, value in sorted(model.state_dict().items()):
            t = value.detach()
            h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.numel():
                d = t.double()
                h.update(f"{d.sum().item():.17g}:{d.square().sum().item():.17g}".encode())
    return h.hexdigest()


def model_config(model: torch.nn.Module) -> Any:
    """The model's diffusers config as plain JSON values (None without one), without the
    private entries (``_name_or_path``, ``_use_default_values``...) that differ between a model
    built from a config and the same model loaded with ``from_pretrained``."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    return json.loads(json.dumps(public, default=str))


def unet_paths(model: torch.nn.Module) -> list[str]:
    """Qualified names of the diffusers UNets in ``model`` ("" for ``model`` itself): modules of
    diffusers' ``ModelMixin`` with a ``conv_in`` and a ``conv_out`` (UNet2DModel,
    UNet2DConditionModel and their kin), not nested in another one."""
    from diffusers import ModelMixin

    found: list[str] = []
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in found if p) or "" in found:
            continue
        is_unet = isinstance(module, ModelMixin) and all(
            isinstance(getattr(module, a, None), torch.nn.Module) for a in ("conv_in", "conv_out")
        )
        if is_unet:
            found.append(name)
    return found
