"""Activation observer choosing the range of least quantization error from a histogram."""

from __future__ import annotations

from torch.ao.quantization.observer import HistogramObserver


class HistogramRangeObserver(HistogramObserver):
    """torch.ao's :class:`~torch.ao.quantization.observer.HistogramObserver` (a histogram of
    every observed value; the range chosen by searching the bins for the least L2 quantization
    error) for any ``quant_min`` .. ``quant_max``.

    torch.ao's observer searches for ``2^8`` levels whatever range it is given; this one searches
    for the ``quant_max - quant_min + 1`` levels the quantizer has (64 for 6-bit activations),
    so a sub-8-bit range is chosen for its own rounding error.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dst_nbins = self.quant_max - self.quant_min + 1
