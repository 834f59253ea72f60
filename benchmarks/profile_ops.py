"""Where the time goes: torch.profiler op groups of fp32 eager vs dmq_fx's int8 graph.

    python benchmarks/profile_ops.py [--bits w4a8] [--batch 8]

DDPM-CIFAR10 UNet (random weights), 2 threads. Groups self-CPU time of the ops into convs,
linears, attention, the activation quantize step and everything else; the last line printed is
a JSON object {"bits", "batch", "fp32": {group: ms}, "quant": {group: ms}}.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import profile

import dmq_fx
from dmq_fx.graph.unet_configs import DDPM_CIFAR10, build_unet, example_inputs

GROUPS = {
    "conv": ("aten::mkldnn_convolution", "onednn::qconv_pointwise", "aten::convolution"),
    "linear": ("aten::addmm", "aten::mm", "onednn::qlinear_pointwise", "aten::linear"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
}


def grouped_ms(fn) -> dict[str, float]:
    with torch.no_grad():
        for _ in range(2):
            fn()
        with profile() as prof:
            fn()
    out = {g: 0.0 for g in [*GROUPS, "other"]}
    for evt in prof.key_averages():
        group = next((g for g, names in GROUPS.items() if evt.key in names), "other")
        out[group] += evt.self_cpu_time_total / 1e3
    out["total"] = sum(out.values())
    return {k: round(v, 1) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(2)
    wb, ab = int(args.bits[1 : args.bits.index("a")]), int(args.bits[args.bits.index("a") + 1 :])
    model = build_unet(DDPM_CIFAR10)
    calib = [example_inputs(model, batch=4, seed=s) for s in range(2)]
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(wb, ab), *calib[0])
    dmq_fx.calibrate(prepared, calib, progress=False)
    quant = dmq_fx.convert_fx(prepared, "x86")
    a, k = example_inputs(model, batch=args.batch, seed=1)
    fp32 = grouped_ms(lambda: model(*a, **k))
    q = grouped_ms(lambda: quant(*a, **k))
    for group in fp32:
        print(f"{group:10s} fp32 {fp32[group]:8.1f} ms   {args.bits} {q[group]:8.1f} ms")
    print(json.dumps({"bits": args.bits, "batch": args.batch, "fp32": fp32, "quant": q}))


if __name__ == "__main__":
    main()
