"""Agreement of dmq_fx.export_onnx models run by onnxruntime / OpenVINO with convert_fx's
reference form, on the committed reference models.

    python benchmarks/onnx_agreement.py [--threads 2]

fashion28 and fashion16-text, DMQ structure (LES scales, PTS on the skip layers) at W4A8 and
W4A6, calibrated on 2 random batches of 8 (noise inputs, random timesteps; fashion16-text with
its committed prompt embeddings), exported with dynamic batch in both weight formats. Printed
per row, SQNR in dB over 2 batches of 8: the reference form against the float UNet (the
quantization error) and each engine against the reference form; the documented bound is a
margin of at least 6 dB. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np
import torch
from onnx_engines import onnxruntime_runner, openvino_runner

import dmq_fx
from dmq_fx.graph.unet_configs import example_inputs
from dmq_fx.lowering.quantized_modules import cpu_features
from dmq_fx.metrics import sqnr_db

STAGES = ["smoothquant", "observe_activations", "vote_pts", "observe_weights"]


def _inputs(name, unet, embeds, batch, seed):
    args, kwargs = example_inputs(unet, batch=batch, seed=seed)
    if name == "fashion16-text":  # real prompt embeddings instead of random ones
        labels = torch.randint(
            0, embeds.shape[0], (batch,), generator=torch.Generator().manual_seed(seed)
        )
        kwargs = {**kwargs, "encoder_hidden_states": embeds[labels]}
    return args, kwargs


def main() -> None:
    from dmq_fx_bench.reference_models import load_fashion16_text, load_fashion28

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU int8 features: {cpu_features()}; {args.threads} threads", flush=True)
    rows = []
    models = {
        "fashion28": lambda: (load_fashion28()[0], None),
        "fashion16-text": lambda: (lambda m: (m[0], m[2]))(load_fashion16_text()),
    }
    for name, load in models.items():
        unet, embeds = load()
        for wb, ab in ((4, 8), (4, 6)):
            data = [_inputs(name, unet, embeds, 8, s) for s in range(2)]
            prepared = dmq_fx.prepare_fx(
                unet, dmq_fx.get_default_qconfig_mapping(wb, ab), *data[0], les=True, pts="skip"
            )
            dmq_fx.calibrate(prepared, data, STAGES, progress=False)
            x86 = dmq_fx.convert_fx(prepared, "x86")
            reference = dmq_fx.convert_fx(prepared, "reference")
            tests = [_inputs(name, unet, embeds, 8, 30 + s) for s in range(2)]
            with torch.no_grad():
                refs = torch.cat([reference(*a, **k).sample for a, k in tests])
                fps = torch.cat([unet(*a, **k).sample for a, k in tests])
            row = {
                "model": name,
                "bits": f"w{wb}a{ab}",
                "quantization_sqnr_db": round(sqnr_db(fps, refs), 1),
            }
            folder = tempfile.mkdtemp()
            for weights in ("packed", "int8"):
                path = f"{folder}/{weights}.onnx"
                dmq_fx.export_onnx(x86, path, *data[0], weights=weights)
                for engine, make in (
                    ("onnxruntime", onnxruntime_runner),
                    ("openvino", openvino_runner),
                ):
                    run, _ = make(path, args.threads)
                    out = torch.cat([torch.from_numpy(np.asarray(run(*a, **k))) for a, k in tests])
                    row[f"{engine} {weights} vs reference_db"] = round(sqnr_db(refs, out), 1)
            print(row, flush=True)
            rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
