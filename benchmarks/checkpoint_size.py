"""Size of a standalone W4A8 checkpoint against the float UNet's fp32 safetensors.

    python benchmarks/checkpoint_size.py [--models fashion28 fashion16-text] [--sd15]
        [--threads 2]

Each UNet is prepared with the DMQ structure (LES, PTS on the skip layers) at W4A8, calibrated
on two random batches (the size does not depend on the calibration), converted (x86) and saved
with ``dmq_fx.save(..., standalone=True)``; its float weights are saved with safetensors in
fp32. The file is then loaded back without the float model (``dmq_fx.load(path)``, timed; its
output is checked ``torch.equal`` to the saved graph's), and building the model from its config
is timed both ways: ``from_config`` (random initialization) and as ``load`` builds it (on the
meta device, then zero-filled CPU storage). ``--sd15`` adds the Stable Diffusion 1.5 UNet
config with random weights (3.4 GB of fp32 weights: needs that much free disk and a few
minutes). The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import dmq_fx
from dmq_fx.graph.unet_configs import SD15, build_unet, example_inputs
from dmq_fx.workflow.serialization import _model_from_config

STAGES = ["smoothquant", "observe_activations", "vote_pts", "observe_weights"]


def _unet(name: str):
    if name == "sd15":
        return build_unet(SD15)
    from dmq_fx_bench.reference_models import load_fashion16_text, load_fashion28

    return {"fashion28": load_fashion28, "fashion16-text": load_fashion16_text}[name]()[0]


def measure(name: str, folder: Path) -> dict:
    unet = _unet(name)
    batch = 1 if name == "sd15" else 8
    data = [example_inputs(unet, batch=batch, seed=s) for s in range(2)]
    prepared = dmq_fx.prepare_fx(
        unet, dmq_fx.get_default_qconfig_mapping(4, 8), *data[0], **dmq_fx.PREPARE_FLAGS["dmq"]
    )
    dmq_fx.calibrate(prepared, data, STAGES, progress=False)
    converted = dmq_fx.convert_fx(prepared, "x86")
    dmq_fx.save(converted, folder / f"{name}.safetensors", standalone=True)
    quantized = (folder / f"{name}.safetensors").stat().st_size
    save_file({k: v.float().contiguous() for k, v in unet.state_dict().items()}, folder / "fp.st")
    fp32 = (folder / "fp.st").stat().st_size
    (folder / "fp.st").unlink()
    start = time.perf_counter()
    loaded = dmq_fx.load(folder / f"{name}.safetensors")
    load_s = time.perf_counter() - start
    with torch.no_grad():
        args, kwargs = data[1]
        same = torch.equal(loaded(*args, **kwargs).sample, converted(*args, **kwargs).sample)
    if not same:
        raise SystemExit(f"{name}: the loaded graph does not compute what the saved one did")
    config = {"model_class": f"{type(unet).__module__}.{type(unet).__qualname__}",
              "model_config": dict(unet.config)}  # fmt: skip
    start = time.perf_counter()
    type(unet).from_config(unet.config)
    random_init_s = time.perf_counter() - start
    start = time.perf_counter()
    _model_from_config(config, name)
    zero_build_s = time.perf_counter() - start
    row = {"model": name, "bits": "w4a8", "fp32_bytes": fp32, "standalone_bytes": quantized,
           "ratio": round(quantized / fp32, 3), "load_s": round(load_s, 2),
           "build_random_init_s": round(random_init_s, 2),
           "build_as_load_does_s": round(zero_build_s, 2)}  # fmt: skip
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["fashion28", "fashion16-text"])
    ap.add_argument("--sd15", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = list(args.models) + (["sd15"] if args.sd15 else [])
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, Path(tmp)) for name in names]
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
