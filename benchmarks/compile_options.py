"""dmq_fx.compile's C++ wrapper against inductor's Python wrapper, on the same lowered graphs.

    python benchmarks/compile_options.py [--batches 1 8] [--repeats 15] [--threads 2]

The W4A8 DMQ-structured graphs of ``speed.py`` (DDPM-CIFAR10, random weights) and of the
committed ``fashion28`` model, each compiled twice with ``dmq_fx.compile(dynamic=False)``:
``options={"cpp_wrapper": False}`` (inductor's Python host code) and the default
(``DEFAULT_INDUCTOR_OPTIONS``: C++ host code). fp32 eager and both compiled graphs run
interleaved, medians of ``--repeats``; outputs of the two compiled graphs are compared. The
first line names the CPU; the last line printed is a JSON list of {"model", "batch",
"fp32_ms", "python_wrapper_ms", "cpp_wrapper_ms", "compile_s": [python, cpp],
"max_abs_diff"}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from dmq_fx_bench.reference_models import load_fashion28
from speed import dmq_fx_graph

import dmq_fx
from dmq_fx.graph.unet_configs import DDPM_CIFAR10, build_unet, example_inputs
from dmq_fx.lowering.quantized_modules import cpu_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU int8 features: {cpu_features()}; {args.threads} threads", flush=True)
    ddpm = build_unet(DDPM_CIFAR10)
    calib = [example_inputs(ddpm, batch=4, seed=s) for s in range(2)]
    models = {"ddpm-cifar10": (ddpm, dmq_fx_graph(ddpm, "w4a8", calib, dmq=True)[0])}
    unet, _ = load_fashion28()
    calib = [example_inputs(unet, batch=8, seed=s) for s in range(4)]
    models["fashion28"] = (unet, dmq_fx_graph(unet, "w4a8", calib, dmq=True)[0])
    rows = []
    for name, (model, quantized) in models.items():
        for batch in args.batches:
            a, k = example_inputs(model, batch=batch, seed=1)
            graphs, compile_s, outs = {}, [], []
            for wrapper, options in (("python", {"cpp_wrapper": False}), ("cpp", None)):
                # a copy each: its own generated forward, so the two compiled caches stay apart
                graph = copy.deepcopy(quantized)
                graphs[wrapper] = dmq_fx.compile(graph, dynamic=False, options=options)
                start = time.perf_counter()
                outs.append(graphs[wrapper](*a, **k).sample)
                compile_s.append(round(time.perf_counter() - start, 1))
            runs = {"fp32": model, **graphs}
            times: dict[str, list[float]] = {n: [] for n in runs}
            with torch.no_grad():
                for rep in range(args.repeats + 2):  # two warm-up rounds
                    for n, fn in runs.items():
                        start = time.perf_counter()
                        fn(*a, **k)
                        if rep >= 2:
                            times[n].append((time.perf_counter() - start) * 1e3)
            med = {n: round(statistics.median(t), 2) for n, t in times.items()}
            row = {
                "model": name,
                "batch": batch,
                "fp32_ms": med["fp32"],
                "python_wrapper_ms": med["python"],
                "cpp_wrapper_ms": med["cpp"],
                "compile_s": compile_s,
                "max_abs_diff": float((outs[0] - outs[1]).abs().max()),
            }
            print(row, flush=True)
            rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
