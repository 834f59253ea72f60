"""scaled_dot_product_attention vs dmq_fx's chunked attention products, per shape.

    python benchmarks/attention.py [--threads 2] [--repeats 15]

The shapes are the attention calls of the UNets this project benchmarks: DDPM-CIFAR10 at 16x16
(32 heads of 8 channels, batch 1 and 8), heads of 16, 32 and 64 channels at the same width, and
fashion28's 7x7 attention, wider sequences and an SD-1.5-like 64x64 self-attention (8 heads of
40). ``dmq_fx::chunked_attention`` runs the chunks where ``runs_chunked`` says so and the flash
kernel elsewhere; this is the measurement behind that bound ("chunked_in_graph"). Both run
interleaved, medians of ``--repeats``; the first line names the CPU, the last line printed is a
JSON list of {"shape", "sdpa_ms", "chunked_ms", "speedup", "max_abs_diff", "chunked_in_graph"}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from dmq_fx.lowering.attention import chunked_products, runs_chunked
from dmq_fx.lowering.quantized_modules import cpu_features

SHAPES = [  # (batch, heads, length, head channels)
    (1, 32, 256, 8),  # DDPM-CIFAR10 at 16x16
    (8, 32, 256, 8),
    (8, 4, 49, 16),  # fashion28 at 7x7
    (8, 16, 256, 16),
    (8, 8, 256, 32),
    (8, 4, 256, 64),
    (2, 16, 1024, 8),  # DDPM-CIFAR10's heads at 32x32
    (2, 8, 4096, 40),  # SD 1.5 at 64x64
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"CPU int8 features: {cpu_features()}; CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; {args.threads} threads",
        flush=True,
    )
    rows = []
    with torch.no_grad():
        for shape in SHAPES:
            q, k, v = (torch.randn(shape) for _ in range(3))
            scale = shape[-1] ** -0.5
            runs = {
                "sdpa": lambda q, k, v, s=scale: F.scaled_dot_product_attention(q, k, v, scale=s),
                "chunked": lambda q, k, v, s=scale: chunked_products(q, k, v, s),
            }
            times: dict[str, list[float]] = {name: [] for name in runs}
            for rep in range(args.repeats + 2):  # two warm-up rounds
                for name, fn in runs.items():
                    start = time.perf_counter()
                    fn(q, k, v)
                    if rep >= 2:
                        times[name].append((time.perf_counter() - start) * 1e3)
            sdpa, chunked = (statistics.median(times[n]) for n in runs)
            diff = (runs["chunked"](q, k, v) - runs["sdpa"](q, k, v)).abs()
            row = {
                "shape": list(shape),
                "sdpa_ms": round(sdpa, 2),
                "chunked_ms": round(chunked, 2),
                "speedup": round(sdpa / chunked, 2),
                "max_abs_diff": float(diff.max()),
                "chunked_in_graph": runs_chunked(shape[2], shape[2], shape[3]),
            }
            print(row, flush=True)
            rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
