"""Weight observer choosing each output channel's range by an L_p error grid search."""

from __future__ import annotations

import torch
from torch.ao.quantization.observer import PerChannelMinMaxObserver


class MSEGridSearchPerChannelObserver(PerChannelMinMaxObserver):
    """Per-channel observer whose range is the best of a shrinking grid (SPEC 1.1).

    Candidate ``i`` (``i = 0 .. num_candidates - 1``) is the range ``[min * (1 - shrink * i),
    max * (1 - shrink * i)]`` of each channel; the candidate with the least mean ``|Q(w) - w|^p``
    over the channel wins. With the defaults (80 candidates, shrink 0.01, p = 2.4) this is the
    weight quantizer of DMQ and Q-Diffusion. Works with affine and symmetric per-channel qschemes;
    the search runs on the last observed tensor (a weight is observed once).
    """

    def __init__(
        self, *args, p: float = 2.4, num_candidates: int = 80, shrink: float = 0.01, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        if not 0 < shrink * (num_candidates - 1) < 1:
            raise ValueError(
                f"shrink * (num_candidates - 1) must lie in (0, 1), got {shrink} * "
                f"{num_candidates - 1}"
            )
        self.p = p
        self.num_candidates = num_candidates
        self.shrink = shrink
        self._observed: torch.Tensor | None = None

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() > 0:
            self._observed = x_orig.detach()
        return super().forward(x_orig)

    def _channel_error(self, w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor):
        wq = torch.fake_quantize_per_channel_affine(
            w, scale.float(), zp.int(), self.ch_axis, self.quant_min, self.quant_max
        )
        err = (wq - w).abs().pow(self.p)
        return err.transpose(0, self.ch_axis).reshape(w.shape[self.ch_axis], -1).mean(1)

    @torch.no_grad()
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self._observed
        if w is None:
            return super().calculate_qparams()
        w = w.float()
        best_scale, best_zp = self._calculate_qparams(self.min_val, self.max_val)
        best_err = self._channel_error(w, best_scale, best_zp)
        for i in range(1, self.num_candidates):
            factor = 1.0 - self.shrink * i
            scale, zp = self._calculate_qparams(self.min_val * factor, self.max_val * factor)
            err = self._channel_error(w, scale, zp)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zp = torch.where(better, zp, best_zp)
        return best_scale, best_zp

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, num_candidates={self.num_candidates}"
