"""What a benchmark ran on and what it used: CPU features, resident memory, device memory."""

from __future__ import annotations

import threading
import time

import torch

#: the CPU features that decide which int8 kernels run (named with every speed figure)
INT8_FEATURES = ("amx_int8", "avx512_vnni", "avx512f", "avx2")


def cpu_features() -> list[str]:
    """The :data:`INT8_FEATURES` this CPU has (from /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = (line for line in f if line.startswith("flags"))
            flags = next((line.split(":", 1)[1].split() for line in lines), [])
    except OSError:
        return []
    return [name for name in INT8_FEATURES if name in flags]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakRSS:
    """Context manager: the peak VmRSS (MiB) while its block runs, sampled every 20 ms, the
    VmRSS when it started (``base``) and the block's wall time (``seconds``)."""

    def __enter__(self) -> PeakRSS:
        self.peak = self.base = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


class PeakDeviceMemory:
    """Context manager: the peak memory (MiB) torch allocated on a CUDA device while its block
    runs (``torch.cuda.max_memory_allocated``), what was allocated when it started (``base``)
    and the block's wall time, synchronized."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakDeviceMemory:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device) / 2**20
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
