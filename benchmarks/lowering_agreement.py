"""End-to-end agreement of the lowered graphs with their simulation on the tiny UNets.

    python benchmarks/lowering_agreement.py [--threads 1]

TINY_DDPM and TINY_SD (random weights), min-max calibration on 3 random batches, at W8A8, W4A8
and W4A6. Printed per row, as SQNR in dB: the simulation against the float UNet (the
quantization error), the reference lowering against the simulation and the x86 lowering
against the reference. Per layer the three agree within 1% of an output step (tests); end to
end a rare integer flipped at a .5 tie is amplified by the random-weight UNet, which is what
this shows. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json

import torch

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.lowering.quantized_modules import cpu_features
from dmq_fx.metrics import sqnr_db


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU int8 features: {cpu_features()}; {args.threads} threads", flush=True)
    rows = []
    for name, config in (("ddpm", TINY_DDPM), ("sd", TINY_SD)):
        for wb, ab in ((8, 8), (4, 8), (4, 6)):
            model = build_unet(config)
            a, k = example_inputs(model, batch=4)
            prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(wb, ab), a, k)
            data = [example_inputs(model, batch=4, seed=100 + s) for s in range(3)]
            dmq_fx.calibrate(prepared, data, progress=False)
            ref = dmq_fx.convert_fx(prepared, "reference")
            nat = dmq_fx.convert_fx(prepared, "x86")
            a, k = example_inputs(model, batch=2, seed=9)
            with torch.no_grad():
                fp, sim, r, n = (g(*a, **k).sample for g in (model, prepared, ref, nat))
            row = {"model": name, "bits": f"w{wb}a{ab}",
                   "quantization_sqnr_db": round(sqnr_db(fp, sim), 1),
                   "reference_vs_sim_db": round(sqnr_db(sim, r), 1),
                   "x86_vs_reference_db": round(sqnr_db(r, n), 1)}  # fmt: skip
            print(row, flush=True)
            rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
