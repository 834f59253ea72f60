"""Every calibration preset on the device the model is on: time, peak memory, agreement.

    python benchmarks/device_check.py [--device cuda|cpu] [--configs tiny-ddpm tiny-sd]
        [--sd15] [--presets ...] [--dtype float32|bfloat16|float16] [--samples 8]
        [--iterations 20] [--threads 2]

For each UNet config (random weights, seeded) and preset: prepare at W4A8 with the preset's
flags, move the prepared graph to ``--device`` (``prepared.to(device)``, as a user does), and
calibrate on ``--samples`` random inputs (batches of 4; learned stages capped at
``--iterations`` steps per unit and at most ``--samples`` samples, so the ``-paper`` presets
differ from the others only in their learning rates here). Then run the simulated graph and
``convert_fx(prepared, "reference")`` on the same device on a fixed test batch and compare both
with the float model (SQNR, dB). Reported per row: the calibration's wall time and peak memory
(``torch.cuda.max_memory_allocated`` on CUDA, the process's peak resident set on the CPU, which
only grows from row to row; ``start_mib`` is the same measure when calibration started), and the
reference form's median forward time (5 calls after a warm-up).

The SD 1.5 config (860 M parameters) runs by default on CUDA and with ``--sd15`` on the CPU
(slow: minutes per preset). Without a CUDA device ``--device cuda`` stops with a message. The
last line printed is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
from dmq_fx_bench.resources import PeakDeviceMemory, PeakRSS, cpu_features
from tqdm.auto import tqdm

import dmq_fx
from dmq_fx.graph.unet_configs import SD15, TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.metrics import sqnr_db

CONFIGS = {"tiny-ddpm": TINY_DDPM, "tiny-sd": TINY_SD, "sd15": SD15}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def budget(preset: str, iterations: int, samples: int) -> list:
    """The preset's stages with every learned stage capped at ``iterations`` and ``samples``."""
    stages = []
    for name in dmq_fx.PRESETS[preset].stages:
        stage = dmq_fx.STAGES[name]
        if dataclasses.is_dataclass(stage) and hasattr(stage, "iterations"):
            stage = dataclasses.replace(stage, iterations=min(stage.iterations, iterations))
            stage = dataclasses.replace(stage, max_samples=samples)
        stages.append(stage)
    return stages


def moved(value, device: torch.device, dtype: torch.dtype):
    """``value`` (nested args / kwargs) on ``device``, its floating tensors in ``dtype``."""

    def move(v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(device, dtype) if v.is_floating_point() else v.to(device)

    return torch.utils._pytree.tree_map(move, value)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check(config: str, preset: str, args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build_unet(CONFIGS[config])
    if dtype != torch.float32:
        model.to(dtype)
    batch = 1 if config == "sd15" else 4
    cpu = torch.device("cpu")
    data = [
        moved(example_inputs(model, batch=batch, seed=s), cpu, dtype)
        for s in range(max(1, args.samples // batch))
    ]
    prepared = dmq_fx.prepare_fx(
        model,
        dmq_fx.get_default_qconfig_mapping(4, 8),
        *data[0],
        **dmq_fx.PREPARE_FLAGS[preset],
    )
    prepared.to(device)
    model.to(device)
    meter = PeakDeviceMemory(device) if device.type == "cuda" else PeakRSS()
    with meter:
        dmq_fx.calibrate(prepared, data, budget(preset, args.iterations, args.samples),
                         progress=False)  # fmt: skip
    test_args, test_kwargs = moved(data[0], device, dtype)
    with torch.no_grad():
        fp = model(*test_args, **test_kwargs).sample.float()
        simulated = prepared(*test_args, **test_kwargs).sample.float()
        reference = dmq_fx.convert_fx(prepared, "reference")
        lowered = reference(*test_args, **test_kwargs).sample.float()
        times = []
        for _ in range(6):
            sync(device)
            start = time.perf_counter()
            reference(*test_args, **test_kwargs)
            sync(device)
            times.append(time.perf_counter() - start)
    row = {
        "config": config,
        "preset": preset,
        "device": str(device),
        "dtype": args.dtype,
        "calibrate_s": round(meter.seconds, 2),
        "peak_mib": round(meter.peak),
        "start_mib": round(meter.base),
        "memory": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "reference_ms": round(1000 * statistics.median(times[1:]), 1),
        "simulated_sqnr_db": round(sqnr_db(fp.cpu(), simulated.cpu()), 2),
        "reference_sqnr_db": round(sqnr_db(fp.cpu(), lowered.cpu()), 2),
    }
    tqdm.write(str(row))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", nargs="*", default=["tiny-ddpm", "tiny-sd"], choices=CONFIGS)
    ap.add_argument("--sd15", action="store_true", help="add the SD 1.5 config on the CPU")
    ap.add_argument("--presets", nargs="*", default=list(dmq_fx.PRESETS), choices=dmq_fx.PRESETS)
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu, or on a machine with one")
    configs = list(args.configs)
    if (device.type == "cuda" or args.sd15) and "sd15" not in configs:
        configs.append("sd15")
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({', '.join(cpu_features()) or 'features unknown'}), {args.threads} threads"
    )
    print(f"device: {where}; CUDA available: {torch.cuda.is_available()}", flush=True)
    jobs = [(c, p) for c in configs for p in args.presets]
    rows = [check(c, p, args) for c, p in tqdm(jobs, desc="device check", unit="preset")]
    print(json.dumps({"device": where, "samples": args.samples,
                      "iterations": args.iterations, "rows": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
