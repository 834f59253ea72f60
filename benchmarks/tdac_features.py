"""How TDAC's density radius meets the reference models' features (docs/methods/eda_dm.md).

    python benchmarks/tdac_features.py [--model fashion28] [--n 64] [--radius 3.0 0.3]

Samples ``--n`` trajectories of the 20-step DDIM sampler with the FP model, takes every step's
mid-attention input (dmq_fx.workflow.calibration_data.step_features), prints quantiles of the mean
squared
distance between steps, and for each radius the density, diversity, weights and per-step counts
of select_samples. The quality benchmark's TDAC_RADIUS comes from this.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import DDIMScheduler
from dmq_fx_bench.reference_models import load_fashion16_text, load_fashion28

from dmq_fx.methods.tdac import allocate_samples, tdac_weights
from dmq_fx.workflow.calibration_data import collect_calibration_data, step_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fashion28", choices=["fashion28", "fashion16-text"])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--radius", type=float, nargs="+", default=[3.0, 0.3])
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "fashion28":
        unet, scheduler = load_fashion28()
        conditioning = {}
    else:
        unet, scheduler, embeds = load_fashion16_text()
        conditioning = dict(
            prompt_embeds=embeds[:10], negative_prompt_embeds=embeds[10:], guidance_scale=4.0
        )
    pool = collect_calibration_data(
        unet,
        DDIMScheduler.from_config(scheduler.config),
        samples_per_step=args.n,
        independent_trajectories=False,
        progress=False,
        **conditioning,
    )
    _, features = step_features(unet, pool, None, progress=False)
    f = torch.stack([x.double() for x in features])
    mse = torch.stack([(f - f[i]).pow(2).flatten(1).mean(1) for i in range(len(f))])
    off = mse[~torch.eye(len(f), dtype=torch.bool)]
    q = torch.quantile(off, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    print(f"{args.model}: pairwise mean squared distance between steps, quantiles 5/25/50/75/95%:")
    print("  " + ", ".join(f"{v:.3f}" for v in q.tolist()))
    for radius in args.radius:
        scores = tdac_weights(features, radius, args.lam)
        counts = allocate_samples(scores.weights, args.n)
        print(f"radius {radius}: density {[int(d) for d in scores.density.tolist()]}")
        print(f"  weights {[round(w, 2) for w in scores.weights.tolist()]}")
        print(f"  counts for n={args.n}: {counts.tolist()}")


if __name__ == "__main__":
    main()
