"""Peak resident memory and time of each stage of a DMQ calibration on a UNet config.

    python benchmarks/memory.py [--config ddpm-cifar10] [--samples 64] [--iterations 5]
                                [--capture restart|cursor] [--mmap-threshold BYTES]

Builds the UNet from its diffusers config (random weights), prepares it at W4A8 with LES and PTS,
and runs the ``dmq`` stages one at a time on ``--samples`` random calibration inputs (batches of
32), then converts. Learning stages run ``--iterations`` steps per unit: memory is set by what a
unit holds (its captured inputs and outputs), not by the iteration count, so a short run measures
it. ``--capture`` picks how LES and AdaRound capture a unit's inputs (``"restart"``: a
forward per unit, holding one unit's inputs; ``"cursor"``: one forward in all, paused at each
unit, holding each sample's live activations). A thread samples VmRSS every 20 ms; each
stage reports its peak and its wall time, with the FP model's parameter size for scale.
``--mmap-threshold`` fixes glibc's mmap threshold (``mallopt(M_MMAP_THRESHOLD)``, what the
``MALLOC_MMAP_THRESHOLD_`` environment variable does): by default glibc raises it as large blocks
are freed, so freed activations stay in the heap and RSS counts them; fixed, every block above it
is returned to the OS when freed. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import json

import torch
from dmq_fx_bench.resources import PeakRSS

import dmq_fx
from dmq_fx.graph.unet_configs import DDPM_CIFAR10, SD15, build_unet, example_inputs

CONFIGS = {"ddpm-cifar10": DDPM_CIFAR10, "sd15": SD15}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="ddpm-cifar10")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--capture", choices=["restart", "cursor"], default="restart")
    ap.add_argument("--mmap-threshold", type=int, help="bytes; glibc only (default: glibc's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.mmap_threshold is not None:
        M_MMAP_THRESHOLD = -3  # glibc's malloc.h
        if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, args.mmap_threshold):
            raise SystemExit(f"mallopt(M_MMAP_THRESHOLD, {args.mmap_threshold}) failed")
    rows = []

    def stage(name, fn):
        with PeakRSS() as m:
            out = fn()
        row = {"stage": name, "peak_rss_mib": round(m.peak), "seconds": round(m.seconds, 1)}
        print(row, flush=True)
        rows.append(row)
        return out

    model = stage("build", lambda: build_unet(CONFIGS[args.config]))
    param_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    batches = [
        example_inputs(model, batch=min(32, args.samples - i), seed=i)
        for i in range(0, args.samples, 32)
    ]
    mapping = dmq_fx.get_default_qconfig_mapping(4, 8)
    prepared = stage(
        "trace+prepare",
        lambda: dmq_fx.prepare_fx(model, mapping, *batches[0], les=True, pts="skip"),
    )
    stages = [
        ("learn_les", dmq_fx.LearnLES(iterations=args.iterations, capture=args.capture)),
        ("observe_activations", "observe_activations"),
        ("vote_pts", "vote_pts"),
        ("observe_weights", "observe_weights"),
        ("adaround", dmq_fx.AdaRound(iterations=args.iterations, capture=args.capture)),
    ]
    for name, s in stages:
        stage(name, lambda s=s: dmq_fx.calibrate(prepared, batches, [s], progress=True))
    stage("convert", lambda: dmq_fx.convert_fx(prepared, "x86"))
    print(
        f"{args.config}: FP parameters {param_mib:.0f} MiB, {args.samples} calibration samples, "
        f"capture={args.capture}"
    )
    summary = {
        "config": args.config,
        "capture": args.capture,
        "mmap_threshold": args.mmap_threshold,
        "param_mib": round(param_mib),
    }
    print(json.dumps({**summary, "rows": rows}))


if __name__ == "__main__":
    main()
