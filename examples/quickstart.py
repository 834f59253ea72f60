"""dmq_fx quick start: quantize a small diffusers UNet2DModel to a static int8 graph.

    python examples/quickstart.py [--bits w8a8] [--backend x86]

Builds a small UNet2DModel (random weights, no download), calibrates it on a few random batches,
converts it, prints the summary, the output error against the float model and the speed-up.
"""

from __future__ import annotations

import argparse
import time

import torch

import dmq_fx
from dmq_fx.graph.unet_configs import SMALL_DDPM, build_unet, example_inputs
from dmq_fx.lowering.quantized_modules import cpu_has_int8_dot_product


def median_ms(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times[1:])[repeats // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description="quantize a small UNet2DModel with dmq_fx")
    ap.add_argument("--bits", default="w8a8", help="w<weight bits>a<activation bits>, e.g. w4a8")
    ap.add_argument("--backend", default="x86", choices=dmq_fx.BACKENDS)
    args = ap.parse_args()
    weight_bits = int(args.bits[1 : args.bits.index("a")])
    act_bits = int(args.bits[args.bits.index("a") + 1 :])
    torch.manual_seed(0)
    torch.set_num_threads(2)

    model = build_unet(SMALL_DDPM)
    sample, timestep = example_inputs(model, batch=4)[0]
    # 1. trace + decide + insert observers (the model itself is never modified)
    prepared = dmq_fx.prepare_fx(
        model, dmq_fx.get_default_qconfig_mapping(weight_bits, act_bits), (sample, timestep)
    )
    # 2. calibrate: here random batches; use real sampler inputs for real models
    data = [example_inputs(model, batch=4, seed=s)[0] for s in range(4)]
    dmq_fx.calibrate(prepared, data)
    # 3. lower to a static quantized graph
    quantized = dmq_fx.convert_fx(prepared, backend=args.backend)
    dmq_fx.summary(quantized, print_table=True)

    x, t = example_inputs(model, batch=8, seed=123)[0]
    with torch.no_grad():
        ref, out = model(x, t).sample, quantized(x, t).sample
        fp_ms = median_ms(lambda: model(x, t))
        q_ms = median_ms(lambda: quantized(x, t))
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()).item()
    forms = [r["form"] for r in dmq_fx.summary(quantized).rows]
    print(
        f"\n{args.bits} {args.backend}: {forms.count('int8')}/{len(forms)} layers on int8 kernels"
    )
    if forms.count("reference") and args.backend != "reference" and not cpu_has_int8_dot_product():
        print(
            "  (this CPU has no VNNI: layers whose int16 pair sums could saturate run in the exact "
            "reference form; try --bits w8a7 or w4a8)"
        )
    print(f"output SQNR vs float: {sqnr:.1f} dB (random weights and random calibration data)")
    print(f"batch 8: fp32 {fp_ms:.1f} ms, quantized {q_ms:.1f} ms, speed-up {fp_ms / q_ms:.2f}x")


if __name__ == "__main__":
    main()
