"""Where the time goes: torch.profiler op groups of fp32 eager vs dmq_fx's int8 graph.

    python benchmarks/profile_ops.py [--bits w4a8] [--batch 8] [--dmq] [--compile] [--repeats 3]

DDPM-CIFAR10 UNet (random weights), 2 threads. Groups the self-CPU time of the ops, per forward
(mean of ``--repeats`` profiled forwards), into convs, linears, attention (the flash kernel, or
dmq_fx's chunked attention with its products and softmax), inductor's fused kernels (with
``--compile``) and everything else. ``--dmq``: the DMQ-structured graph (LES steps, PTS on the
skip layers, as ``speed.py``'s "les+pts" rows); ``--compile``: that graph through
``dmq_fx.compile`` (compiled before profiling; inductor's kernels named in the profile, the five
slowest printed with the ops they fuse in their names). The
last line printed is a JSON object {"bits", "batch", "dmq", "compile", "fp32": {group: ms},
"quant": {group: ms}}.
"""

from __future__ import annotations

import argparse
import json

import torch
from speed import dmq_fx_graph
from torch.profiler import profile

import dmq_fx
from dmq_fx.graph.unet_configs import DDPM_CIFAR10, build_unet, example_inputs
from dmq_fx.lowering.quantized_modules import cpu_features

GROUPS = {
    "conv": (
        "aten::mkldnn_convolution",
        "onednn::qconv_pointwise",
        "aten::convolution",
        "mkldnn::_convolution_pointwise",
        # the same kernels called from inductor's C++ wrapper (dmq_fx.compile's default)
        "aoti_torch_cpu__qconv_pointwise_tensor",
        "aoti_torch_cpu_mkldnn__convolution_pointwise",
    ),
    "linear": (
        "aten::addmm",
        "aten::mm",
        "onednn::qlinear_pointwise",
        "aten::linear",
        "mkl::_mkl_linear",
        "aoti_torch_cpu__qlinear_pointwise_tensor",
        "aoti_torch_cpu__mkl_linear",
    ),
    "attention": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "dmq_fx::chunked_attention",
        "aten::bmm",
        "aten::_softmax",
    ),
}


def grouped_ms(fn, repeats: int = 1) -> dict[str, float]:
    with torch.no_grad():
        for _ in range(2):
            fn()
        with profile() as prof:
            for _ in range(repeats):
                fn()
    out = {g: 0.0 for g in [*GROUPS, "fused kernels", "other"]}
    fused = []
    for evt in prof.key_averages():
        group = next((g for g, names in GROUPS.items() if evt.key in names), None)
        if group is None:  # inductor's kernels are named graph_<n>_cpp_fused_...
            group = "fused kernels" if "cpp_fused" in evt.key else "other"
        ms = evt.self_cpu_time_total / 1e3 / repeats
        out[group] += ms
        if group == "fused kernels":
            fused.append((ms, evt.key))
    for ms, name in sorted(fused, reverse=True)[:5]:  # the slowest of inductor's kernels
        print(f"  fused kernel {ms:7.2f} ms  {name}")
    out["total"] = sum(out.values())
    return {k: round(v, 1) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dmq", action="store_true", help="the DMQ-structured graph (les+pts)")
    ap.add_argument("--compile", action="store_true", help="profile dmq_fx.compile's graph")
    ap.add_argument("--repeats", type=int, default=3, help="profiled forwards (mean)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"CPU int8 features: {cpu_features()}; 2 threads", flush=True)
    model = build_unet(DDPM_CIFAR10)
    calib = [example_inputs(model, batch=4, seed=s) for s in range(2)]
    quant, _, _ = dmq_fx_graph(model, args.bits, calib, dmq=args.dmq)
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # name each fused kernel
        quant = dmq_fx.compile(quant, dynamic=False)
    a, k = example_inputs(model, batch=args.batch, seed=1)
    fp32 = grouped_ms(lambda: model(*a, **k), args.repeats)
    q = grouped_ms(lambda: quant(*a, **k), args.repeats)
    for group in fp32:
        print(f"{group:14s} fp32 {fp32[group]:8.1f} ms   {args.bits} {q[group]:8.1f} ms")
    print(
        json.dumps(
            {
                "bits": args.bits,
                "batch": args.batch,
                "dmq": args.dmq,
                "compile": args.compile,
                "fp32": fp32,
                "quant": q,
            }
        )
    )


if __name__ == "__main__":
    main()
