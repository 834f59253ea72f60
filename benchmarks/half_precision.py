"""Quantizing a bf16 / fp16 UNet against quantizing its float32 weights.

    python benchmarks/half_precision.py [--presets minmax pts] [--bits w4a8] [--threads 2]

The committed ``fashion28`` DDPM, its float32 weights and the same weights cast to bfloat16 and
float16, each prepared, calibrated (20-step DDIM inputs of the float32 model, 8 per step) and
converted (x86 and reference) with each preset. Reported: the SQNR (dB) of each model's noise
prediction against the float32 UNet's, on held-out sampler inputs (seed 1), for the float model
itself and for each lowering. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from baselines import parse_bits
from diffusers import DDIMScheduler
from dmq_fx_bench.reference_models import load_fashion28

import dmq_fx
from dmq_fx.lowering.quantized_modules import cpu_features
from dmq_fx.metrics import sqnr_db


def _cast(batch, dtype):
    (x, t), kwargs = batch
    return (x.to(dtype), t), {k: v.to(dtype) for k, v in kwargs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["minmax", "pts"])
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU int8 features: {cpu_features()}; {args.threads} threads", flush=True)
    wb, ab = parse_bits(args.bits)
    unet, train_scheduler = load_fashion28()
    scheduler = DDIMScheduler.from_config(train_scheduler.config)

    def collect(seed):
        return dmq_fx.calibration.collect_calibration_data(
            unet, scheduler, num_inference_steps=20, samples_per_step=8, seed=seed, progress=False
        )

    calib, held_out = collect(0), collect(1)
    ((test_args, test_kwargs),) = held_out.batches(len(held_out), shuffle=False)
    with torch.no_grad():
        reference = unet(*test_args, **test_kwargs).sample
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = copy.deepcopy(unet).to(dtype)
        a, k = _cast((test_args, test_kwargs), dtype)
        with torch.no_grad():
            float_sqnr = sqnr_db(reference, model(*a, **k).sample.float())
        for preset in args.presets:
            spec = dmq_fx.PRESETS[preset]
            batches = [_cast(b, dtype) for b in calib.batches(32, seed=0)]
            prepared = dmq_fx.prepare_fx(
                model, dmq_fx.get_default_qconfig_mapping(wb, ab), *batches[0],
                **spec.prepare_flags,
            )  # fmt: skip
            dmq_fx.calibrate(prepared, batches, spec, progress=False)
            row = {"dtype": str(dtype).replace("torch.", ""), "preset": preset,
                   "bits": args.bits, "float_sqnr_db": round(float_sqnr, 2)}  # fmt: skip
            for backend in ("reference", "x86"):
                with torch.no_grad():
                    out = dmq_fx.convert_fx(prepared, backend)(*a, **k).sample
                assert out.dtype == dtype
                row[f"{backend}_sqnr_db"] = round(sqnr_db(reference, out.float()), 2)
            print(row, flush=True)
            rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
