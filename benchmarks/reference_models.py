"""Checks of the committed reference models, with the figures quoted in tests and notes.

    python benchmarks/reference_models.py [--seeds 0 1 2]

fashion28: share of 64 DDIM samples the classifier labels with confidence > 0.8, classes among
them, largest class count; the same for pure noise. fashion16-text: share of guided samples
(guidance 4, 6 per class, upsampled to 28x28) classified as the prompted class. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from dmq_fx_bench.reference_models import (
    load_fashion16_text,
    load_fashion28,
    load_fashion_classifier,
    sample_ddim,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(2)
    clf = load_fashion_classifier()
    unet28, sched28 = load_fashion28()
    unet16, sched16, embeds = load_fashion16_text()
    labels = torch.arange(10).repeat_interleave(6)
    rows = []
    with torch.no_grad():
        for seed in args.seeds:
            probs = clf(sample_ddim(unet28, sched28, 64, seed=seed)).softmax(1)
            noise = clf(torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(seed)))
            noise = noise.softmax(1)
            x16 = sample_ddim(
                unet16,
                sched16,
                len(labels),
                seed=seed,
                prompt_embeds=embeds[labels],
                negative_prompt_embeds=embeds[10],
                guidance_scale=4.0,
            )
            pred16 = clf(F.interpolate(x16, size=28, mode="bilinear", align_corners=False)).argmax(
                1
            )
            conf = probs.max(1).values > 0.8
            row = {
                "seed": seed,
                "fashion28_confident": round(conf.float().mean().item(), 3),
                "fashion28_classes": len(set(probs.argmax(1)[conf].tolist())),
                "fashion28_largest_class": int(torch.bincount(probs.argmax(1)).max()),
                "noise_confident": round((noise.max(1).values > 0.8).float().mean().item(), 3),
                "noise_largest_class": int(torch.bincount(noise.argmax(1)).max()),
                "fashion16_text_prompt_accuracy": round(
                    (pred16 == labels).float().mean().item(), 3
                ),
            }
            print(row, flush=True)
            rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
