"""fp32 eager vs lowered int8 graphs on the DDPM-CIFAR10 UNet (random weights).

    python benchmarks/speed.py [--bits w8a8 w8a7 w4a8] [--dmq-bits w4a8] [--batches 1 8]
        [--repeats 15] [--no-torchao] [--pt2e] [--compile] [--sampling] [--onnx] [--openvino]

Rows: dmq_fx's x86 lowering at each bit setting; the DMQ-structured graph ("dmq_fx les+pts",
--dmq-bits, default w4a8: LES scales (SmoothQuant's closed form standing in for learned tau: the
same lowering) and PTS on the skip layers, lowered as integer shifts); and torch.ao's own FX PTQ
(x86 default qconfig, which quantizes activations to 7 bits: reduce_range) on the graph from
dmq_fx.trace; with --pt2e, torchao's pt2e flow with dmq_fx.pt2e.DMQQuantizer at W8A8 compiled by
inductor with freezing (the two warm-up rounds include the compile of each batch size). Every
repeat
times fp32 and every quantized graph back to back (interleaved), so machine load hits all alike;
medians are reported. With --compile every dmq_fx graph also gets a "<method>+compile" row:
dmq_fx.compile (torch.compile, fullgraph, inductor with freezing), one compile per batch size
before the timed rounds (``compile_s``). With --sampling, an end-to-end row: 20-step DDIM
sampling of the committed fashion28 model at batch 8, fp32 against its W4A8 DMQ-structured graph
eager and compiled, in images per second. With --onnx, the DMQ-structured graph exported by
dmq_fx.export_onnx runs on onnxruntime and (if installed) OpenVINO with f32 float parts, in the
same interleaved loop ("int8_layers": layer input groups on integer kernels after the engine's
own optimisation, of "layers"). With --openvino, OpenVINO's own PTQ: the float UNet converted by
OpenVINO and quantized by NNCF (INT8, transformer model type, calibrated on the same 2 batches),
f32 float parts. The first line names the CPU's int8 features. The last
line printed is a JSON list with one object per run: {"config", "batch", "bits", "method",
"fp32_ms", "quant_ms", "speedup", "int8_layers", "layers", "compile_s"}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from baselines import parse_bits, torchao_fx_quantize

import dmq_fx
from dmq_fx.graph.unet_configs import DDPM_CIFAR10, build_unet, example_inputs
from dmq_fx.lowering.quantized_modules import QuantizedLayer, cpu_features

#: the DMQ graph's structure without the learning: SmoothQuant's closed-form tau stands in for
#: learned LES (same lowering: per-channel quantize steps or norm folding), PTS voted on the skip
#: layers; AdaRound changes integer values only, not the graph
DMQ_STRUCTURE_STAGES = ("smoothquant", "observe_activations", "vote_pts", "observe_weights")


def dmq_fx_graph(model, bits: str, calib, dmq: bool = False):
    wb, ab = parse_bits(bits)
    prepared = dmq_fx.prepare_fx(
        model,
        dmq_fx.get_default_qconfig_mapping(wb, ab),
        *calib[0],
        les=dmq,
        pts="skip" if dmq else None,
    )
    stages = DMQ_STRUCTURE_STAGES if dmq else dmq_fx.DEFAULT_STAGES
    dmq_fx.calibrate(prepared, calib, stages, progress=False)
    quant = dmq_fx.convert_fx(prepared, "x86")
    forms = [m.form for m in quant.modules() if isinstance(m, QuantizedLayer)]
    return quant, forms.count("int8"), len(forms)


def torchao_fx_graph(model, calib):
    quant = torchao_fx_quantize(model, calib[0], calib)
    layers = sum(
        type(m).__module__.startswith("torch.ao.nn.quantized") and hasattr(m, "weight")
        for m in quant.modules()
    )
    return quant, layers, layers  # every torch.ao quantized layer runs an int8 kernel


def pt2e_inductor_graph(model, calib):
    """torchao pt2e with dmq_fx's DMQQuantizer (W8A8), compiled by inductor with freezing:
    onednn int8 conv / linear kernels (needs torchao; compiles on the first call per shape)."""
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from dmq_fx.pt2e import DMQQuantizer, export_unet

    inductor_config.freezing = True  # constant-fold the quantized weights into prepacked ones
    prepared = prepare_pt2e(export_unet(model, *calib[0]), DMQQuantizer(8, 8))
    with torch.no_grad():
        for args, kwargs in calib:
            prepared(*args, **kwargs)
    converted = convert_pt2e(prepared)
    layers = sum(
        n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
        and n.args[0].target == torch.ops.quantized_decomposed.dequantize_per_tensor.default
        for n in converted.graph.nodes
    )
    compiled = torch.compile(converted, backend="inductor")
    return compiled, layers, layers


def onnx_engine_graphs(quant, model, calib, bits: str, threads: int) -> list[tuple]:
    """The graph exported by dmq_fx.export_onnx (dynamic batch) on onnxruntime's CPU provider and,
    if installed, OpenVINO's CPU plugin with f32 float parts (``INFERENCE_PRECISION_HINT``). Each
    row's int8 count is the quantized layers the engine runs on integer kernels after its own
    graph optimisation (onnx_engines.py prints the kernels)."""
    import tempfile

    from onnx_engines import onnxruntime_runner, openvino_runner

    folder = tempfile.mkdtemp(prefix="dmq_fx_onnx_")
    layers = sum(m.num_groups for m in quant.modules() if isinstance(m, QuantizedLayer))
    rows = []
    # each engine gets the weight format it runs fastest: onnxruntime the default (packed),
    # OpenVINO int8 (it decompresses 4-bit weights to float)
    for name, weights, make in (
        ("onnxruntime", "packed", onnxruntime_runner),
        ("openvino f32", "int8", openvino_runner),
    ):
        path = f"{folder}/unet-{weights}.onnx"
        if not os.path.exists(path):
            dmq_fx.export_onnx(quant, path, *calib[0], weights=weights)
        try:
            runner, int8 = make(path, threads)
        except ImportError as e:
            print(f"skipping {name}: {e}", flush=True)
            continue
        rows.append((f"dmq_fx les+pts onnx {name}", f"{bits} ({weights})", runner, int8, layers))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", nargs="+", default=["w8a8", "w8a7", "w4a8"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-torchao", action="store_true", help="skip torch.ao's own PTQ row")
    ap.add_argument(
        "--pt2e", action="store_true", help="add the torchao pt2e + inductor W8A8 row (compiles)"
    )
    ap.add_argument(
        "--dmq-bits", nargs="*", default=["w4a8"], help="bits of the DMQ-structured graph rows"
    )
    ap.add_argument("--compile", action="store_true", help="add dmq_fx.compile rows (compiles)")
    ap.add_argument(
        "--sampling", action="store_true", help="add the fashion28 20-step sampling row"
    )
    ap.add_argument(
        "--openvino",
        action="store_true",
        help="add OpenVINO's own INT8 PTQ row: the float UNet quantized by NNCF",
    )
    ap.add_argument(
        "--onnx",
        action="store_true",
        help="add onnxruntime and OpenVINO rows on the DMQ-structured graph exported to ONNX",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_unet(DDPM_CIFAR10)
    print(
        f"CPU int8 features: {cpu_features()}; torch {torch.__version__}, {args.threads} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}",
        flush=True,
    )
    calib = [example_inputs(model, batch=4, seed=s) for s in range(2)]
    graphs = [("dmq_fx", bits, *dmq_fx_graph(model, bits, calib)) for bits in args.bits]
    graphs += [
        ("dmq_fx les+pts", bits, *dmq_fx_graph(model, bits, calib, dmq=True))
        for bits in args.dmq_bits
    ]
    if not args.no_torchao:
        graphs.append(("torchao-fx", "w8a8 (a7 reduce_range)", *torchao_fx_graph(model, calib)))
    if args.pt2e:
        graphs.append(("pt2e+inductor", "w8a8", *pt2e_inductor_graph(model, calib)))
    if args.onnx:
        graphs += [
            row
            for method, bits, graph, _, _ in list(graphs)
            if method == "dmq_fx les+pts"
            for row in onnx_engine_graphs(graph, model, calib, bits, args.threads)
        ]
    if args.openvino:
        from onnx_engines import nncf_openvino_runner

        runner, int8 = nncf_openvino_runner(model, calib, args.threads)
        graphs.append(("openvino nncf (float UNet)", "int8", runner, int8, int8))
    if args.compile:
        graphs += [
            (f"{method}+compile", bits, dmq_fx.compile(graph, dynamic=False), int8, layers)
            for method, bits, graph, int8, layers in graphs
            if method.startswith("dmq_fx") and isinstance(graph, torch.nn.Module)
        ]
    results = []
    for batch in args.batches:
        a, k = example_inputs(model, batch=batch, seed=1)
        compile_s = {}
        with torch.no_grad():
            for i, (method, _, graph, _, _) in enumerate(graphs):
                if method.endswith("+compile"):  # compiles for this shape, outside the timing
                    start = time.perf_counter()
                    graph(*a, **k)
                    compile_s[i] = round(time.perf_counter() - start, 1)
                    print(f"{method}: compiled batch {batch} in {compile_s[i]} s", flush=True)
        times: dict[int, list[float]] = {i: [] for i in range(-1, len(graphs))}
        with torch.no_grad():
            for rep in range(args.repeats + 2):  # two warm-up rounds (packing, allocator)
                for i, fn in [(-1, model)] + [(i, g[2]) for i, g in enumerate(graphs)]:
                    t = time.perf_counter()
                    fn(*a, **k)
                    if rep >= 2:
                        times[i].append((time.perf_counter() - t) * 1e3)
        fp32 = statistics.median(times[-1])
        for i, (method, bits, _, int8_layers, layers) in enumerate(graphs):
            q = statistics.median(times[i])
            row = {
                "config": "ddpm-cifar10",
                "batch": batch,
                "bits": bits,
                "method": method,
                "fp32_ms": round(fp32, 1),
                "quant_ms": round(q, 1),
                "speedup": round(fp32 / q, 2),
                "int8_layers": int8_layers,
                "layers": layers,
                "compile_s": compile_s.get(i),
            }
            print(row, flush=True)
            results.append(row)
    if args.sampling:
        results.append(sampling_row(args.repeats, compiled=True))
    print(json.dumps(results))


def sampling_row(repeats: int, compiled: bool, batch: int = 8, steps: int = 20) -> dict:
    """20-step DDIM sampling of fashion28 at ``batch``: fp32 vs the W4A8 DMQ-structured graph
    (calibrated on the model's own sampler inputs), eager and compiled; images per second."""
    from diffusers import DDIMScheduler
    from dmq_fx_bench.reference_models import load_fashion28, sample_ddim

    unet, train_scheduler = load_fashion28()
    data = dmq_fx.calibration.collect_calibration_data(
        unet,
        DDIMScheduler.from_config(train_scheduler.config),
        num_inference_steps=steps,
        samples_per_step=16,
        independent_trajectories=False,
        progress=False,
    )
    batches = list(data.batches(32, seed=0))
    prepared = dmq_fx.prepare_fx(
        unet, dmq_fx.get_default_qconfig_mapping(4, 8), *batches[0], les=True, pts="skip"
    )
    dmq_fx.calibrate(prepared, batches, DMQ_STRUCTURE_STAGES, progress=False)
    quant = dmq_fx.convert_fx(prepared, "x86")
    runners = {"fp32": unet, "dmq_fx les+pts": quant}
    compile_s = None
    if compiled:
        runners["dmq_fx les+pts+compile"] = dmq_fx.compile(quant, dynamic=False)
        start = time.perf_counter()
        sample_ddim(
            runners["dmq_fx les+pts+compile"],
            train_scheduler,
            batch,
            steps=steps,
            sample_shape=(1, 28, 28),
        )
        compile_s = round(time.perf_counter() - start, 1)
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad():
        for rep in range(max(3, repeats // 3) + 1):
            for name, fn in runners.items():
                start = time.perf_counter()
                sample_ddim(
                    fn, train_scheduler, batch, steps=steps, seed=rep, sample_shape=(1, 28, 28)
                )
                if rep >= 1:
                    times[name].append(time.perf_counter() - start)
    ips = {name: batch / statistics.median(t) for name, t in times.items()}
    row = {
        "config": "fashion28 sampling",
        "batch": batch,
        "bits": "w4a8",
        "method": "images/s",
        **{name: round(v, 2) for name, v in ips.items()},
        **{
            f"speedup {name}": round(v / ips["fp32"], 2)
            for name, v in ips.items()
            if name != "fp32"
        },
        "compile_s": compile_s,
    }
    print(row, flush=True)
    return row


if __name__ == "__main__":
    main()
