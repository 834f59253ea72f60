"""EDA-DM's calibration-sample selection (TDAC, docs/methods/eda_dm.md): the arithmetic and the
feature.

Each sampling step ``k`` has a feature ``F_k`` (the input of the UNet's middle attention block
for a fixed set of trajectories, :func:`mid_attention_input`). :func:`tdac_weights` scores the
steps by density (how many other steps lie within ``radius`` in mean squared distance) and
diversity (summed channel-cosine distance to every other step), both min-max normalised, and
:func:`allocate_samples` turns the weights into per-step sample counts that sum to exactly N.
:func:`dmq_fx.workflow.calibration_data.select_samples` runs the whole selection on a sampler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import fx

from dmq_fx.errors import ConfigError

__all__ = ["TDACWeights", "allocate_samples", "mid_attention_input", "tdac_weights"]


@dataclasses.dataclass
class TDACWeights:
    """Per-step scores: raw density ``D_k`` and diversity ``V_k``, and ``w_k = D̂_k + λ V̂_k``
    from their min-max normalised values."""

    density: torch.Tensor
    diversity: torch.Tensor
    weights: torch.Tensor


def _min_max(v: torch.Tensor) -> torch.Tensor:
    span = v.max() - v.min()
    return torch.zeros_like(v) if span == 0 else (v - v.min()) / span


def tdac_weights(features: Sequence[torch.Tensor], radius: float, lam: float) -> TDACWeights:
    """Density and diversity of every step's feature (each ``(batch, C, ...)``, same shape,
    the same trajectories in the same order).

    ``D_k = #{j != k : mean((F_k - F_j)^2) <= radius}``; ``V_k = sum_{j != k} sum over batch
    and positions of (1 - cos(F_k, F_j))``, the cosine taken along channels (dim 1).
    """
    if len(features) < 2:
        raise ConfigError("TDAC needs the features of at least two sampling steps")
    shape = features[0].shape
    if any(f.shape != shape for f in features) or len(shape) < 2:
        raise ConfigError(f"TDAC features must share one (batch, channels, ...) shape, got {shape}")
    if radius < 0 or lam < 0:
        raise ConfigError(f"TDAC radius and lambda must be >= 0, got {radius}, {lam}")
    k = len(features)
    feats = torch.stack([f.double() for f in features])  # (K, B, C, ...)
    unit = torch.nn.functional.normalize(feats, dim=2)
    density = torch.zeros(k, dtype=torch.float64)
    diversity = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        mse = (feats - feats[i]).pow(2).flatten(1).mean(1)  # (K,)
        cos = (unit * unit[i]).sum(2).flatten(1)  # (K, B * positions)
        others = torch.arange(k) != i
        density[i] = (mse[others] <= radius).sum()
        diversity[i] = (1 - cos[others]).sum()
    weights = _min_max(density) + lam * _min_max(diversity)
    return TDACWeights(density, diversity, weights)


def allocate_samples(weights: torch.Tensor, n: int, min_per_step: int = 0) -> torch.Tensor:
    """Per-step counts for ``n`` samples: ``min_per_step`` each, the rest in proportion to
    ``weights``.

    Each step gets ``floor(q_k)`` or ``ceil(q_k)`` of its quota ``q_k = rest * w_k / sum(w)``
    (``round(q_k)`` whenever rounding already sums to the total), the remainder going to the
    largest fractional parts (on ties the larger weight, then the earlier step): the counts sum
    to exactly ``n``, none is negative, and a larger weight never gets fewer samples. All-zero
    weights share equally.
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.dim() != 1 or len(w) == 0:
        raise ConfigError("allocate_samples needs a 1-d tensor of per-step weights")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ConfigError("allocate_samples: weights must be finite and >= 0")
    if n < 0 or min_per_step < 0:
        raise ConfigError(
            f"allocate_samples: n and min_per_step must be >= 0, got {n}, {min_per_step}"
        )
    k = len(w)
    if min_per_step * k > n:
        raise ConfigError(
            f"min_per_step={min_per_step} over {k} steps needs at least {min_per_step * k} "
            f"samples, got n={n}"
        )
    rest = n - min_per_step * k
    if w.sum() == 0:
        w = torch.ones_like(w)
    quota = rest * w / w.sum()
    counts = torch.floor(quota).long()
    remainder = quota - counts
    # ties: the larger weight first (quotas can round equal), then the earlier step
    order = sorted(range(k), key=lambda i: (-float(remainder[i]), -float(w[i]), i))
    for i in order[: rest - int(counts.sum())]:
        counts[i] += 1
    return counts + min_per_step


def _stack_paths(node: fx.Node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def mid_attention_input(gm: fx.GraphModule) -> fx.Node:
    """The node feeding the UNet's middle attention block (``mid_block.attentions.0``: an
    ``Attention`` in UNet2DModel, a ``Transformer2DModel`` in UNet2DConditionModel), found by
    walking a graph traced by :func:`dmq_fx.trace`. Without mid-block attention, the input of
    the mid block itself. Raises :class:`ConfigError` when the UNet has no mid block."""
    for scope in ("mid_block.attentions.0", "mid_block"):
        inside = [n for n in gm.graph.nodes if scope in _stack_paths(n)]
        if not inside:
            continue
        members = set(inside)
        for n in inside:
            for a in n.all_input_nodes:
                meta = a.meta.get("tensor_meta")
                shape = getattr(meta, "shape", None)
                if a not in members and shape is not None and len(shape) == 4:
                    return a
    raise ConfigError(
        "TDAC reads the input of the UNet's middle attention block, but the graph has no "
        "'mid_block' (a UNet built with mid_block_type=None?)"
    )
