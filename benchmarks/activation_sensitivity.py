"""Which activation quantizers cost a reference model most of its output accuracy.

    python benchmarks/activation_sensitivity.py --model fashion16-text --act-bits 6

The model is prepared with 8-bit weights and ``--act-bits`` activations (the default mapping,
min / max ranges) and calibrated (``observe_activations``, ``observe_weights``) on the uniform
calibration set of quality.py (``--per-step`` samples at each of the 20 DDIM steps). Then, with
the weights float, the output SQNR (dB, against the float model, on the first ``--batches``
calibration batches of 32) is measured with every activation quantizer on, and with each one
alone; the table lists the quantizers by their share of the summed output noise
(``10^(-SQNR/10)``, noise adding as if independent), largest first.
"""

from __future__ import annotations

import argparse
import math

import torch
from quality import CalibrationSets, reference_models

import dmq_fx
from dmq_fx.metrics import prediction, sqnr_db
from dmq_fx.quantize.modes import input_quantizers, set_quantizer_mode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fashion16-text", choices=["fashion28", "fashion16-text"])
    ap.add_argument("--act-bits", type=int, default=6)
    ap.add_argument("--per-step", type=int, default=8)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = reference_models([args.model])[0]
    calib = CalibrationSets(ref, args.per_step, seed=0).uniform
    example = next(calib.batches(8, shuffle=False))
    mapping = dmq_fx.get_default_qconfig_mapping(8, args.act_bits)
    prepared = dmq_fx.prepare_fx(ref.unet, mapping, *example)
    batches = list(calib.batches(32, seed=0))
    stages = ["observe_activations", "observe_weights"]
    dmq_fx.calibrate(prepared, batches, stages, progress=False)
    held_out = batches[: args.batches]

    def outputs() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([prediction(prepared(*a, **k)) for a, k in held_out])

    set_quantizer_mode(prepared, "float")
    reference = outputs()
    set_quantizer_mode(prepared, "simulate", "activations")
    print(f"{args.model}: every activation at {args.act_bits} bits, weights float: "
          f"{sqnr_db(reference, outputs()):.2f} dB output SQNR")  # fmt: skip
    quantizers = {id(q) for q in input_quantizers(prepared)}
    named = [(n, m) for n, m in prepared.named_modules() if id(m) in quantizers]
    set_quantizer_mode(prepared, "float")
    rows = []
    for name, q in named:
        q.enable_fake_quant(True)
        rows.append((sqnr_db(reference, outputs()), name))
        q.enable_fake_quant(False)
    rows.sort()
    total = sum(10 ** (-s / 10) for s, _ in rows)
    print("| activation quantizer | output SQNR alone (dB) | share of the summed noise |")
    print("|---|---|---|")
    for s, name in rows[: args.top]:
        print(f"| {name} | {s:.2f} | {10 ** (-s / 10) / total:.1%} |")
    print(f"{len(rows)} quantizers; their summed noise: {-10 * math.log10(total):.2f} dB")


if __name__ == "__main__":
    main()
