"""What onnxruntime and OpenVINO make of a model written by dmq_fx.export_onnx.

    python benchmarks/onnx_engines.py [--bits w4a8] [--threads 2]

Exports the DMQ-structured DDPM-CIFAR10 graph (benchmarks/speed.py's "dmq_fx les+pts") and
prints, per engine, the kernels its optimised graph runs: onnxruntime's op types after its
graph optimisations (QDQ fusion turns DequantizeLinear -> Conv / MatMul into integer kernels
where it can), OpenVINO's runtime model (each Convolution / MatMul with the precision it runs
in). speed.py --onnx imports the two runners from here.
"""

from __future__ import annotations

import argparse
import collections
import tempfile

import numpy as np
import torch

#: onnxruntime kernels that multiply integers
ORT_INTEGER_OPS = {
    "QLinearConv",
    "ConvInteger",
    "QLinearMatMul",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "MatMulNBits",
}


def _inputs(args, kwargs) -> dict:
    """A UNet call's inputs by name (the names the exported models' inputs have)."""
    return {"sample": args[0], "timestep": torch.as_tensor(args[1]), **kwargs}


def _feeds(input_names, args, kwargs) -> dict:
    values = _inputs(args, kwargs)
    return {name: np.ascontiguousarray(values[name].numpy()) for name in input_names}


def onnxruntime_session(path: str, threads: int, optimized_path: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnxruntime_kernels(path: str, threads: int) -> collections.Counter:
    import onnx

    optimized = tempfile.mkdtemp() + "/optimized.onnx"
    onnxruntime_session(path, threads, optimized)
    return collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)


def onnxruntime_runner(path: str, threads: int):
    session = onnxruntime_session(path, threads)
    names = [i.name for i in session.get_inputs()]
    kernels = onnxruntime_kernels(path, threads)

    def run(*args, **kwargs):
        return session.run(None, _feeds(names, args, kwargs))[0]

    return run, sum(kernels[op] for op in ORT_INTEGER_OPS)


def openvino_model(path: str, threads: int):
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    return ov.Core().compile_model(path, "CPU", config)


def openvino_kernels(compiled) -> collections.Counter:
    """(layer type, runtime precision) of every op of the runtime model."""
    counts = collections.Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        counts[(layer, precision)] += 1
    return counts


def openvino_integer_layers(compiled) -> int:
    """Convolution / FullyConnected / MatMul nodes of the runtime model running in u8 / i8."""
    return sum(
        n for (layer, precision), n in openvino_kernels(compiled).items()
        if layer in ("Convolution", "FullyConnected", "MatMul") and precision in ("u8", "i8")
    )  # fmt: skip


def openvino_runner(path: str, threads: int):
    compiled = openvino_model(path, threads)
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]
    int8 = openvino_integer_layers(compiled)

    def run(*args, **kwargs):
        return request.infer(_feeds(names, args, kwargs))[0]

    return run, int8


def main() -> None:
    from speed import dmq_fx_graph

    import dmq_fx
    from dmq_fx.graph.unet_configs import DDPM_CIFAR10, build_unet, example_inputs
    from dmq_fx.lowering.quantized_modules import cpu_features

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default="packed", choices=["packed", "int8"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU int8 features: {cpu_features()}")
    model = build_unet(DDPM_CIFAR10)
    calib = [example_inputs(model, batch=4, seed=s) for s in range(2)]
    quant, _, layers = dmq_fx_graph(model, args.bits, calib, dmq=True)
    path = tempfile.mkdtemp() + "/unet.onnx"
    dmq_fx.export_onnx(quant, path, *calib[0], weights=args.weights)
    print(f"{layers} quantized layers ({args.bits}, DMQ structure)")
    kernels = onnxruntime_kernels(path, args.threads)
    print("onnxruntime:", dict(kernels.most_common()))
    try:
        print("openvino:", dict(openvino_kernels(openvino_model(path, args.threads)).most_common()))
    except ImportError as e:
        print(f"openvino not installed: {e}")


if __name__ == "__main__":
    main()


def nncf_openvino_runner(model, calib, threads: int):
    """The float UNet converted by OpenVINO and quantized by NNCF (INT8, its transformer model
    type, calibrated on ``calib``'s batches), run with f32 float parts: OpenVINO's own PTQ, for
    comparison with dmq_fx's exported graph. Returns (runner, integer layers)."""
    import nncf
    import openvino as ov

    with torch.no_grad():
        float_model = ov.convert_model(model, example_input=_inputs(*calib[0]))
    names = [i.get_any_name() for i in float_model.inputs]
    dataset = nncf.Dataset(calib, lambda batch: _feeds(names, *batch))
    quantized = nncf.quantize(
        float_model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib)
    )
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(quantized, "CPU", config)
    request = compiled.create_infer_request()
    int8 = openvino_integer_layers(compiled)

    def run(*args, **kwargs):
        return request.infer(_feeds(names, args, kwargs))[0]

    return run, int8
