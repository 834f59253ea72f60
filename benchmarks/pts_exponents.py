"""Plot the power-of-two exponents PTS chooses per channel of fashion28's skip layers.

    python benchmarks/pts_exponents.py [--out docs/pts_exponents.png] [--per-step 8]

Records calibration data from the committed fashion28 model (20-step DDIM, eta 1), prepares it
at W4A8 with ``pts="skip"``, runs the ``pts`` preset (min-max ranges, then voting with kappa 0.85,
D = 3; no LES, to keep it to seconds) and draws, for every skip layer's input (two per decoder
shortcut with the split), the exponent j_c of each channel: step s * 2^(j_c - 3). Prints the share
of channels at each exponent per layer.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402
from dmq_fx.passes import input_quantizer_name  # noqa: E402
from dmq_fx_bench.reference_models import load_fashion28  # noqa: E402

import dmq_fx  # noqa: E402
from dmq_fx.graph.meta import quantized_layer_nodes  # noqa: E402
from dmq_fx.workflow.calibration_data import collect_calibration_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/pts_exponents.png")
    ap.add_argument("--per-step", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    unet, sched = load_fashion28()
    calib = collect_calibration_data(
        unet,
        DDIMScheduler.from_config(sched.config),
        num_inference_steps=20,
        samples_per_step=args.per_step,
        seed=0,
        progress=True,
    )
    example = next(calib.batches(8, shuffle=False))
    prepared = dmq_fx.prepare_fx(
        unet, dmq_fx.get_default_qconfig_mapping(4, 8), *example, pts="skip"
    )
    dmq_fx.calibrate(prepared, list(calib.batches(32, seed=0)), dmq_fx.PRESETS["pts"])
    rows = []
    for node in quantized_layer_nodes(prepared):
        spec = node.meta["dmq_fx"]
        if spec.pts is None:
            continue
        n = len(spec.input_groups)
        for g in range(n):
            q = prepared.get_submodule(input_quantizer_name(node.target, g, n))
            label = node.target.replace("_blocks.", "").replace(".resnets.", "r")
            label = label.replace(".conv_shortcut", "") + (f" in{g}" if n > 1 else "")
            rows.append((label, q.observer.exponents.clone()))
    width = max(len(e) for _, e in rows)
    grid = torch.full((len(rows), width), float("nan"))
    for i, (_, e) in enumerate(rows):
        grid[i, : len(e)] = e.float()
        shares = [f"{(e == j).float().mean():.0%}" for j in range(4)]
        print(f"{rows[i][0]:>14}: channels {len(e):3d}, exponent 0..3: {' '.join(shares)}")
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.2))
    cmap = matplotlib.colormaps["viridis"].resampled(4)
    im = ax.imshow(
        grid.numpy(), aspect="auto", cmap=cmap, vmin=-0.5, vmax=3.5, interpolation="nearest"
    )
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.set_xlabel("input channel")
    ax.set_title("PTS exponent j_c per channel (step s * 2^(j_c - 3)); fashion28 W4A8, kappa 0.85")
    fig.colorbar(im, ax=ax, ticks=range(4), label="j_c")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
