"""Channel-wise power-of-two activation scales (PTS) chosen by voting (docs/methods/pts.md)."""

from __future__ import annotations

import torch
from torch.ao.quantization.fake_quantize import FakeQuantize
from torch.ao.quantization.observer import MovingAverageMinMaxObserver

__all__ = ["PowerOfTwoFakeQuantize", "PowerOfTwoVotingObserver", "candidate_errors"]

SELECTIONS = ("vote", "mse")


def candidate_errors(
    x: torch.Tensor,
    scale: float,
    zero_point: int,
    quant_min: int,
    quant_max: int,
    max_shift: int,
    ch_axis: int = 1,
) -> torch.Tensor:
    """Per sample and channel, the mean squared quantization error of each candidate step.

    ``x`` has samples along axis 0 and channels along ``ch_axis``; candidate ``j``
    (``0 .. max_shift``) is the step ``scale * 2^(j - max_shift)`` with the shared
    ``zero_point``. Returns a ``(samples, channels, max_shift + 1)`` tensor.
    """
    x = x.detach().float().movedim(ch_axis, 1)
    x = x.reshape(x.shape[0], x.shape[1], -1)
    errors = []
    for j in range(max_shift + 1):
        step = scale * 2.0 ** (j - max_shift)
        xq = torch.fake_quantize_per_tensor_affine(x, step, zero_point, quant_min, quant_max)
        errors.append((xq - x).pow(2).mean(2))
    return torch.stack(errors, dim=2)


def _argmin_prefer_coarse(values: torch.Tensor) -> torch.Tensor:
    """argmin over the last axis; ties go to the largest index (the coarsest step)."""
    last = values.shape[-1] - 1
    return last - values.flip(-1).argmin(-1)


def _argmax_prefer_coarse(values: torch.Tensor) -> torch.Tensor:
    last = values.shape[-1] - 1
    return last - values.flip(-1).argmax(-1)


class PowerOfTwoVotingObserver(MovingAverageMinMaxObserver):
    """Per-tensor asymmetric range plus a power-of-two step factor per channel.

    The range (step ``s``, zero point ``z``) is observed as by torch.ao's
    ``MovingAverageMinMaxObserver``. Then, with :meth:`start_voting`, each observed sample
    votes, for every channel ``c``, for the candidate ``j`` in ``0 .. max_shift`` whose step
    ``s * 2^(j - max_shift)`` quantizes that channel with the least squared error (ties go to the
    coarser step). ``selection="vote"``: a channel adopts the most voted candidate when at least
    ``kappa`` of the samples agree, else it keeps ``s`` (``j = max_shift``). ``selection="mse"``:
    the candidate with the least error summed over all samples (the ablation of
    docs/methods/pts.md).
    ``exponents`` holds ``j`` per channel (all ``max_shift`` until votes are counted).
    """

    def __init__(
        self,
        *args,
        ch_axis: int = 1,
        max_shift: int = 3,
        kappa: float = 0.85,
        selection: str = "vote",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if not 0 < kappa <= 1:
            raise ValueError(f"kappa must be in (0, 1], got {kappa}")
        if not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(f"max_shift must be a non-negative integer, got {max_shift!r}")
        self.ch_axis = ch_axis
        self.max_shift = max_shift
        self.kappa = kappa
        self.selection = selection
        self.voting = False
        self.register_buffer("votes", torch.zeros(0, max_shift + 1, dtype=torch.long))
        self.register_buffer("summed_errors", torch.zeros(0, max_shift + 1, dtype=torch.float64))
        self.register_buffer("exponents", torch.zeros(0, dtype=torch.long))

    def start_voting(self) -> None:
        """Freeze the range and count votes from the next observed tensors on."""
        self.voting = True
        self.votes = torch.zeros(0, self.max_shift + 1, dtype=torch.long)
        self.summed_errors = torch.zeros(0, self.max_shift + 1, dtype=torch.float64)

    def finish_voting(self) -> torch.Tensor:
        """Decide each channel's exponent from the counted votes; returns ``exponents``."""
        self.voting = False
        if self.votes.numel() == 0:
            raise RuntimeError("PowerOfTwoVotingObserver: no sample was observed while voting")
        if self.selection == "mse":
            self.exponents = _argmin_prefer_coarse(self.summed_errors)
        else:
            mode = _argmax_prefer_coarse(self.votes)
            agree = self.votes.gather(1, mode[:, None])[:, 0]
            adopted = agree >= self.kappa * self.votes.sum(1)
            self.exponents = torch.where(adopted, mode, torch.full_like(mode, self.max_shift))
        return self.exponents

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if not self.voting:
            return super().forward(x_orig)
        if x_orig.numel() == 0:
            return x_orig
        scale, zero_point = self.calculate_qparams()
        errors = candidate_errors(
            x_orig,
            float(scale),
            int(zero_point),
            self.quant_min,
            self.quant_max,
            self.max_shift,
            self.ch_axis,
        )
        channels = errors.shape[1]
        if self.votes.shape[0] != channels:
            self.votes = torch.zeros(
                channels, self.max_shift + 1, dtype=torch.long, device=errors.device
            )
            self.summed_errors = torch.zeros(
                channels, self.max_shift + 1, dtype=torch.float64, device=errors.device
            )
        choice = _argmin_prefer_coarse(errors)  # (samples, channels)
        self.votes += torch.nn.functional.one_hot(choice, self.max_shift + 1).sum(0)
        self.summed_errors += errors.double().sum(0)
        return x_orig

    def channel_factors(self, channels: int) -> torch.Tensor:
        """``2^(j_c - max_shift)`` per channel (ones before any vote)."""
        if self.exponents.numel() == 0:
            return torch.ones(channels, device=self.exponents.device)
        return 2.0 ** (self.exponents.float() - self.max_shift)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, max_shift={self.max_shift}, kappa={self.kappa}, "
            f"selection={self.selection}"
        )


class PowerOfTwoFakeQuantize(FakeQuantize):
    """Fake quantization with a per-tensor zero point and per-channel steps ``s * 2^(j_c - D)``.

    Its observer is a :class:`PowerOfTwoVotingObserver`; ``scale`` and ``zero_point`` are the
    per-tensor ``s`` and ``z`` (as in torch.ao's FakeQuantize), :meth:`channel_steps` the steps
    actually used.
    """

    def __init__(self, observer=PowerOfTwoVotingObserver, **observer_kwargs) -> None:
        super().__init__(observer=observer, **observer_kwargs)
        if not isinstance(self.activation_post_process, PowerOfTwoVotingObserver):
            raise TypeError("PowerOfTwoFakeQuantize needs a PowerOfTwoVotingObserver")

    @property
    def observer(self) -> PowerOfTwoVotingObserver:
        return self.activation_post_process

    def channel_steps(self, channels: int) -> torch.Tensor:
        """The step of every channel: ``scale * 2^(j_c - max_shift)``."""
        return float(self.scale) * self.observer.channel_factors(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled[0] == 1:
            self.activation_post_process(x.detach())
            if not self.observer.voting:
                scale, zero_point = self.calculate_qparams()
                self.scale.resize_(scale.shape).copy_(scale)
                self.zero_point.resize_(zero_point.shape).copy_(zero_point)
        if self.fake_quant_enabled[0] == 1:
            axis = self.observer.ch_axis % x.dim()
            channels = x.shape[axis]
            steps = self.channel_steps(channels).to(x.device)
            zero_points = torch.full((channels,), int(self.zero_point), dtype=torch.int32)
            x = torch.fake_quantize_per_channel_affine(
                x, steps, zero_points.to(x.device), axis, self.quant_min, self.quant_max
            )
        return x
