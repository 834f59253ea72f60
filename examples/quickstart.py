"""dmq_fx quick start: quantize the committed Fashion-MNIST diffusion model and look at it.

    python examples/quickstart.py [--preset minmax] [--bits auto] [--out quickstart.png]

Loads ``fashion28`` (a trained 1.16M-parameter UNet2DModel shipped in benchmarks/models),
records calibration inputs from its own 20-step DDIM sampler, calibrates with a preset,
converts to an integer graph, then samples the same noise with the float and the quantized
UNet and writes both grids side by side to a PNG. Prints the paired metrics (noise-prediction
SQNR on the float trajectory, image PSNR) and the UNet's speed-up at batch 8, eager and compiled
with ``dmq_fx.compile`` (interleaved medians, CPU features named; the compile takes about a
minute). ``--bits auto``: w8a8 on CPUs with VNNI / AMX int8, w8a7 on AVX2-only CPUs, where
8-bit activations would fall back to the exact but slow reference form.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from dmq_fx_bench.evaluation import psnr_db
from dmq_fx_bench.reference_models import load_fashion28, sample_ddim
from PIL import Image

import dmq_fx
from dmq_fx.lowering.quantized_modules import cpu_features, cpu_has_int8_dot_product
from dmq_fx.metrics import sqnr_db


def interleaved_median_ms(fns: dict, repeats: int = 15) -> dict[str, float]:
    """Median wall time of each callable, calls interleaved so that load changes hit all."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def grid_image(images: torch.Tensor, rows: int, scale: int = 4) -> Image.Image:
    """(N, 1, H, W) in [-1, 1] as a ``rows``-row grid, each pixel ``scale`` x ``scale``."""
    n, _, h, w = images.shape
    cols = n // rows
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    grid = pixels.reshape(rows, cols, h, w).permute(0, 2, 1, 3).reshape(rows * h, cols * w)
    return Image.fromarray(grid.numpy()).resize((cols * w * scale, rows * h * scale), 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="minmax", choices=sorted(dmq_fx.PRESETS))
    ap.add_argument("--bits", default="auto", help="auto, or w<weight bits>a<act bits>: w4a8")
    ap.add_argument("--backend", default="x86", choices=dmq_fx.BACKENDS)
    ap.add_argument("--samples", type=int, default=16, help="images per grid")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="quickstart.png")
    ap.add_argument("--no-compile", action="store_true", help="skip the dmq_fx.compile timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bits = args.bits
    if bits == "auto":
        bits = "w8a8" if cpu_has_int8_dot_product() else "w8a7"
    weight_bits, act_bits = (int(b) for b in bits[1:].split("a"))
    print(f"CPU: {cpu_features()}; {args.threads} threads; {bits} ({args.bits}), {args.preset}")

    unet, train_scheduler = load_fashion28()
    scheduler = DDIMScheduler.from_config(train_scheduler.config)
    # 1. calibration inputs: what the UNet sees at each of the sampler's 20 steps
    data = dmq_fx.calibration.collect_calibration_data(
        unet,
        scheduler,
        num_inference_steps=20,
        samples_per_step=16,
        independent_trajectories=False,
        batch_size=64,
        progress=False,
    )
    # 2. trace and insert quantizers; 3. calibrate; 4. lower to integer kernels
    example = next(iter(data.batches(8)))
    prepared = dmq_fx.prepare_fx(
        unet,
        dmq_fx.get_default_qconfig_mapping(weight_bits, act_bits),
        *example,
        **dmq_fx.PREPARE_FLAGS[args.preset],
    )
    start = time.perf_counter()
    dmq_fx.calibrate(prepared, data.batches(32, seed=0), args.preset)
    quantized = dmq_fx.convert_fx(prepared, backend=args.backend)
    calib_s = time.perf_counter() - start
    forms = [row["form"] for row in dmq_fx.summary(quantized).rows]
    print(f"calibrate + convert: {calib_s:.1f} s; {forms.count('int8')}/{len(forms)} layers int8")

    # the same noise through both UNets; the quantized one's noise prediction is also compared
    # on the float trajectory's inputs, step by step
    with torch.no_grad():
        steps = []
        float_images = sample_ddim(
            unet, train_scheduler, args.samples, seed=0, on_step=lambda *a: steps.append(a)
        )
        eps_sqnr = [sqnr_db(eps, quantized(x, t).sample) for _, t, x, eps in steps]
        quant_images = sample_ddim(
            quantized, train_scheduler, args.samples, seed=0, sample_shape=(1, 28, 28)
        )
        x8, t8 = torch.randn(8, 1, 28, 28), torch.tensor(500)
        runners = {"fp32": lambda: unet(x8, t8), "quantized": lambda: quantized(x8, t8)}
        if not args.no_compile:  # torch.compile with inductor: one graph, fused, int8 kernels
            compiled = dmq_fx.compile(quantized, dynamic=False)
            start = time.perf_counter()
            compiled(x8, t8)
            print(f"dmq_fx.compile: compiled batch 8 in {time.perf_counter() - start:.0f} s")
            runners["compiled"] = lambda: compiled(x8, t8)
        ms = interleaved_median_ms(runners)
    rows = 2 if args.samples % 2 == 0 else 1
    left, right = grid_image(float_images, rows), grid_image(quant_images, rows)
    canvas = Image.new("L", (left.width * 2 + 16, left.height), 255)
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 16, 0))
    canvas.save(args.out)
    print(f"wrote {Path(args.out).resolve()} (float left, quantized right, same noise)")
    print(
        f"noise-prediction SQNR vs float: mean {statistics.mean(eps_sqnr):.1f} dB over 20 steps "
        f"(worst {min(eps_sqnr):.1f}); image PSNR {psnr_db(float_images, quant_images):.1f} dB"
    )
    for name in [n for n in ms if n != "fp32"]:
        print(
            f"UNet batch 8: fp32 {ms['fp32']:.1f} ms, {name} {ms[name]:.1f} ms, "
            f"speed-up {ms['fp32'] / ms[name]:.2f}x (interleaved medians of 15)"
        )


if __name__ == "__main__":
    main()
