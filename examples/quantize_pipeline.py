"""Quantize a diffusers pipeline in one call and compare its samples with the float pipeline's.

    python examples/quantize_pipeline.py [--preset dmq] [--bits w4a8] [--out pipeline_grids]

Builds a DDIMPipeline around the committed fashion28 reference model (no download), quantizes
its UNet with ``dmq_fx.quantize_pipeline`` (calibration data from the pipeline's own scheduler),
generates the same noise with both pipelines and writes ``fp.png`` and ``<preset>-<bits>.png``
side by side into ``--out``, then saves the quantized UNet with ``dmq_fx.save`` and checks that
``dmq_fx.load`` gives the same samples. With the defaults (dmq, W4A8, 8 calibration samples per
step) the calibration takes about 10 minutes on 2 CPU cores; ``--preset minmax`` a few seconds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from diffusers.utils import make_image_grid
from dmq_fx_bench.reference_models import load_fashion28

import dmq_fx


def generate(pipe, n: int, steps: int):
    out = pipe(
        batch_size=n,
        num_inference_steps=steps,
        eta=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return out.images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="dmq", choices=sorted(dmq_fx.PRESETS))
    ap.add_argument("--bits", default="w4a8", help="w<weight bits>a<activation bits>")
    ap.add_argument("--samples-per-step", type=int, default=8)
    ap.add_argument("--n", type=int, default=16, help="images per grid")
    ap.add_argument("--out", default="pipeline_grids")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weight_bits = int(args.bits[1 : args.bits.index("a")])
    act_bits = int(args.bits[args.bits.index("a") + 1 :])

    unet, scheduler = load_fashion28()
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    config = dmq_fx.QuantizationConfig(
        preset=args.preset,
        weight_bits=weight_bits,
        act_bits=act_bits,
        samples_per_step=args.samples_per_step,
    )
    t = time.perf_counter()
    quantized = dmq_fx.quantize_pipeline(pipe, config)
    print(f"quantize_pipeline({args.preset}, {args.bits}): {time.perf_counter() - t:.0f} s")
    quantized.set_progress_bar_config(disable=True)

    fp_images = generate(pipe, args.n, 20)
    q_images = generate(quantized, args.n, 20)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = max(1, args.n // 8)
    for name, images in (("fp", fp_images), (f"{args.preset}-{args.bits}", q_images)):
        grid = make_image_grid(DDIMPipeline.numpy_to_pil(images), rows, len(images) // rows)
        grid.save(out / f"{name}.png")
    mse = float(np.mean((q_images - fp_images) ** 2))
    print(f"PSNR of the quantized samples against the float ones: {10 * np.log10(1 / mse):.1f} dB")
    print(f"grids written to {out}/")

    dmq_fx.save(quantized.unet.graph, out / "unet.safetensors")
    reloaded = dmq_fx.QuantizedUNet(
        dmq_fx.load(out / "unet.safetensors", unet), unet.config, unet.dtype
    )
    reloaded_pipe = DDIMPipeline(unet=reloaded, scheduler=quantized.scheduler)
    reloaded_pipe.set_progress_bar_config(disable=True)
    again = generate(reloaded_pipe, args.n, 20)
    print("saved and reloaded: identical samples" if np.array_equal(again, q_images) else "")
    assert np.array_equal(again, q_images), "the reloaded UNet generates other samples"


if __name__ == "__main__":
    main()
