"""Per-timestep activation quantization parameters (docs/methods/quantizers.md: one set per
sampling step)."""

from __future__ import annotations

import copy

import torch
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from dmq_fx.errors import TimestepOutOfGridError

__all__ = ["TimestepOutOfGridError", "TimestepTableFakeQuantize", "nearest_grid_index"]


def nearest_grid_index(grid: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Index of the nearest calibrated timestep for each of ``timesteps`` (ties: the lower).

    A timestep below the grid's smallest or above its largest entry raises
    :class:`TimestepOutOfGridError`: no table entry was calibrated for it.
    """
    if grid.numel() == 0:
        raise TimestepOutOfGridError("the timestep table is empty: calibrate it first")
    t = timesteps.reshape(-1).to(torch.float64)
    lo, hi = float(grid.min()), float(grid.max())
    outside = (t < lo) | (t > hi)
    if outside.any():
        bad = t[outside][0].item()
        raise TimestepOutOfGridError(
            f"timestep {bad:g} is outside the calibrated grid [{lo:g}, {hi:g}] of the "
            f"per-timestep activation tables; calibrate with data covering it"
        )
    return (t[:, None] - grid.to(torch.float64)[None, :]).abs().argmin(1)


class TimestepTableFakeQuantize(FakeQuantizeBase):
    """One activation fake quantizer per calibrated timestep, selected by the call's timestep.

    Called as ``quantizer(x, timestep)`` (``timestep``: a number, or a 0-d or per-sample
    tensor). While observing, each sample is routed to the entry of its own timestep (created
    from ``template`` the first time the timestep is seen), so batches may mix timesteps. With
    fake quantization on, each sample uses the entry of the nearest calibrated timestep; a
    timestep outside the calibrated range raises :class:`TimestepOutOfGridError`. ``grid``
    holds the calibrated timesteps in ascending order, ``entries`` their quantizers.
    """

    def __init__(self, template: FakeQuantizeBase) -> None:
        super().__init__()
        self.template = template
        self.entries = torch.nn.ModuleList()
        self.register_buffer("grid", torch.zeros(0, dtype=torch.float64))
        self.quant_min, self.quant_max = template.quant_min, template.quant_max
        self.dtype, self.qscheme = template.dtype, template.qscheme

    # flags apply to every entry
    def enable_fake_quant(self, enabled: bool = True) -> FakeQuantizeBase:
        super().enable_fake_quant(enabled)
        for fq in [self.template, *self.entries]:
            fq.enable_fake_quant(enabled)
        return self

    def enable_observer(self, enabled: bool = True) -> FakeQuantizeBase:
        super().enable_observer(enabled)
        for fq in [self.template, *self.entries]:
            fq.enable_observer(enabled)
        return self

    def _entry_for(self, t: float) -> FakeQuantizeBase:
        hits = (self.grid == t).nonzero()
        if len(hits):
            return self.entries[int(hits[0])]
        entry = copy.deepcopy(self.template)
        position = int((self.grid < t).sum())
        entries = list(self.entries)
        entries.insert(position, entry)
        self.entries = torch.nn.ModuleList(entries)
        self.grid = torch.cat(
            [self.grid[:position], self.grid.new_tensor([t]), self.grid[position:]]
        )
        return entry

    def forward(self, x: torch.Tensor, timestep) -> torch.Tensor:
        observing = bool(self.observer_enabled[0])
        quantizing = bool(self.fake_quant_enabled[0])
        if not observing and not quantizing:
            return x
        t = torch.as_tensor(timestep).reshape(-1).to(torch.float64)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        if observing:
            for value in t.unique():
                mask = t == value
                self._entry_for(float(value))(x[mask] if not mask.all() else x)
            if not quantizing:
                return x
        index = nearest_grid_index(self.grid, t)
        if bool((index == index[0]).all()):
            return self.entries[int(index[0])](x)
        out = torch.empty_like(x)
        for k in index.unique():
            mask = index == k
            out[mask] = self.entries[int(k)](x[mask])
        return out

    def calculate_qparams(self):
        """Per entry ``(scale, zero_point)`` stacked along a leading timestep axis."""
        pairs = [fq.calculate_qparams() for fq in self.entries]
        return torch.stack([s for s, _ in pairs]), torch.stack([z for _, z in pairs])

    def extra_repr(self) -> str:
        return f"timesteps={[round(v) for v in self.grid.tolist()]}"
