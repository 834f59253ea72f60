"""Command line: ``python -m dmq_fx report ...`` writes a quantization report to a folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _float_model(args):
    if args.reference:
        from dmq_fx_bench.reference_models import load_fashion16_text, load_fashion28

        if args.reference == "fashion28":
            unet, scheduler = load_fashion28()
            return unet, scheduler, {}
        unet, scheduler, embeds = load_fashion16_text()
        guided = dict(prompt_embeds=embeds[:10], negative_prompt_embeds=embeds[10:])
        return unet, scheduler, dict(guided, guidance_scale=4.0)
    import diffusers

    config = json.loads((Path(args.unet) / "config.json").read_text())
    cls = getattr(diffusers, config.get("_class_name", "UNet2DModel"))
    model = cls.from_pretrained(args.unet, local_files_only=True, low_cpu_mem_usage=False)
    return model.eval(), None, {}


def report_command(args) -> None:
    import torch
    from diffusers import DDIMScheduler

    from dmq_fx import load, report
    from dmq_fx.workflow.calibration_data import CalibrationData, collect_calibration_data

    torch.set_num_threads(args.threads)
    unet, scheduler, conditioning = _float_model(args)
    quantized = load(args.quantized, unet)
    if args.calibration:
        data = CalibrationData.load(args.calibration)
    else:
        scheduler = DDIMScheduler.from_config(scheduler.config) if scheduler else DDIMScheduler()
        data = collect_calibration_data(
            unet, scheduler, samples_per_step=args.samples_per_step, seed=0, **conditioning
        )
    result = report(unet, quantized, data, samples_per_timestep=args.samples_per_step)
    written = result.write(args.out)
    print(result)
    print("written:", ", ".join(str(p) for p in written))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dmq_fx")
    sub = ap.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="per-layer, per-timestep SQNR, ranges, PTS, LES plots")
    src = rep.add_mutually_exclusive_group(required=True)
    src.add_argument("--unet", help="folder of a diffusers UNet (save_pretrained), offline")
    src.add_argument("--reference", choices=["fashion28", "fashion16-text"])
    rep.add_argument("--quantized", required=True, help="file written by dmq_fx.save")
    rep.add_argument("--calibration", help="CalibrationData file (default: sample unconditionally)")
    rep.add_argument("--samples-per-step", type=int, default=8)
    rep.add_argument("--out", required=True, help="folder for report.md, CSV and PNG plots")
    rep.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.command == "report":
        report_command(args)


if __name__ == "__main__":
    sys.exit(main())
