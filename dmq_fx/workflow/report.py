"""``report``: where a quantized UNet loses accuracy, layer by layer and timestep by timestep.

In the manner of torch.ao's numeric suite, each quantized layer is compared with its float self
on the same inputs: the float model's own input to the layer at each calibrated timestep goes
through the layer once in float and once quantized (its activation and weight quantizers and
LES scales, everything else float), and the SQNR of the outputs is recorded. With it: the range
of each layer's float input per timestep, the PTS exponents chosen per channel, and the LES
tau statistics. :meth:`QuantReport.write` puts a CSV, a Markdown table and PNG plots in a folder;
``python -m dmq_fx report`` does it from the command line.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx
from tqdm.auto import tqdm

from dmq_fx.errors import CalibrationError
from dmq_fx.graph.meta import ANNOTATION_KEY
from dmq_fx.graph.units import capture_unit_inputs, reconstruction_units, unit_graph
from dmq_fx.metrics import sqnr_db
from dmq_fx.observers import PowerOfTwoFakeQuantize, TimestepTableFakeQuantize
from dmq_fx.passes import les_scale_name
from dmq_fx.quantize.modes import layer_quantizers, quantizer_mode
from dmq_fx.workflow.calibration_data import CalibrationData
from dmq_fx.workflow.serialization import calibrated_graph

__all__ = ["QuantReport", "report", "sqnr_db"]


def _save(fig, path: Path) -> Path:
    from matplotlib import pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclasses.dataclass
class QuantReport:
    """``per_timestep``: one row per layer and timestep (``layer``, ``timestep``, ``sqnr_db``,
    ``input_min``, ``input_max``); ``layers``: one row per layer (mean / worst SQNR over the
    timesteps, LES tau statistics, PTS exponent counts)."""

    per_timestep: list[dict[str, Any]]
    layers: list[dict[str, Any]]

    def __str__(self) -> str:
        cols = ["layer", "sqnr_db_mean", "sqnr_db_min", "worst_timestep", "tau", "pts_exponents"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in self.layers:
            lines.append("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
        return "\n".join(lines)

    def write(self, folder: str | Path) -> list[Path]:
        """Write ``report.md``, ``per_timestep.csv`` and the PNG plots into ``folder``;
        returns the written paths."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "report.md", out / "per_timestep.csv"]
        written[0].write_text(str(self) + "\n")
        with open(written[1], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.per_timestep[0]))
            writer.writeheader()
            writer.writerows(self.per_timestep)
        layers = [row["layer"] for row in self.layers]
        timesteps = sorted({row["timestep"] for row in self.per_timestep}, reverse=True)
        grid = torch.full((len(layers), len(timesteps)), math.nan)
        span = torch.full_like(grid, math.nan)
        for row in self.per_timestep:
            i, j = layers.index(row["layer"]), timesteps.index(row["timestep"])
            grid[i, j] = min(row["sqnr_db"], 99.0)
            span[i, j] = math.log10(max(row["input_max"] - row["input_min"], 1e-12))
        height = max(4.0, 0.18 * len(layers))
        for name, values, label in (
            ("sqnr_per_timestep.png", grid, "SQNR (dB), float vs quantized layer output"),
            ("input_ranges.png", span, "log10 of the layer input's range (max - min)"),
        ):
            fig, ax = plt.subplots(figsize=(8, height))
            image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis")
            ax.set_yticks(range(len(layers)), layers, fontsize=6)
            ax.set_xticks(range(len(timesteps)), [str(t) for t in timesteps], fontsize=6)
            ax.set_xlabel("timestep")
            fig.colorbar(image, ax=ax, label=label)
            written.append(_save(fig, out / name))
        fig, ax = plt.subplots(figsize=(8, height))
        means = [min(row["sqnr_db_mean"], 99.0) for row in self.layers]
        ax.barh(range(len(layers)), means, color="tab:blue")
        ax.set_yticks(range(len(layers)), layers, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("mean SQNR over timesteps (dB)")
        written.append(_save(fig, out / "sqnr_per_layer.png"))
        pts = [row for row in self.layers if row["pts_exponents"]]
        if pts:
            fig, ax = plt.subplots(figsize=(8, max(3.0, 0.3 * len(pts))))
            left = [0.0] * len(pts)
            for j in range(max(len(r["pts_counts"]) for r in pts)):
                counts = [r["pts_counts"][j] if j < len(r["pts_counts"]) else 0 for r in pts]
                ax.barh(range(len(pts)), counts, left=left, label=f"j = {j}")
                left = [a + b for a, b in zip(left, counts)]
            ax.set_yticks(range(len(pts)), [r["layer"] for r in pts], fontsize=7)
            ax.set_xlabel("channels per PTS exponent j (step s * 2^(j - D))")
            ax.legend(fontsize=7)
            written.append(_save(fig, out / "pts_exponents.png"))
        les = [row for row in self.layers if row["tau_stats"]]
        if les:
            fig, ax = plt.subplots(figsize=(8, max(4.0, 0.18 * len(les))))
            for i, row in enumerate(les):
                lo, mean, hi = row["tau_stats"]
                ax.plot([lo, hi], [i, i], color="tab:gray")
                ax.plot([mean], [i], "o", color="tab:orange", markersize=3)
            ax.set_xscale("log")
            ax.set_yticks(range(len(les)), [r["layer"] for r in les], fontsize=6)
            ax.invert_yaxis()
            ax.set_xlabel("LES tau: min - max, mean (dot)")
            written.append(_save(fig, out / "les_tau.png"))
        return written


def _pts_counts(gm: fx.GraphModule, node: fx.Node) -> list[int]:
    counts: list[int] = []
    for q in layer_quantizers(gm, node):
        entries = list(q.entries) if isinstance(q, TimestepTableFakeQuantize) else [q]
        for e in entries:
            if isinstance(e, PowerOfTwoFakeQuantize) and e.observer.exponents.numel():
                hist = torch.bincount(e.observer.exponents, minlength=e.observer.max_shift + 1)
                counts = [a + b for a, b in zip(hist.tolist(), counts + [0] * len(hist))]
    return counts


def report(
    float_model: torch.nn.Module,
    quantized: fx.GraphModule,
    calibration_data: CalibrationData,
    *,
    samples_per_timestep: int = 16,
    progress: bool = True,
) -> QuantReport:
    """Per-layer, per-timestep SQNR of ``quantized`` against ``float_model`` on the same inputs.

    ``quantized``: a calibrated graph or its :func:`dmq_fx.convert_fx` result (rebuilt in
    fake-quant form on ``float_model``; the lowering agrees with it to one quantization step).
    ``calibration_data``: sampler inputs
    (:func:`~dmq_fx.workflow.calibration_data.collect_calibration_data`);
    up to ``samples_per_timestep`` rows of each timestep are used. Neither model is modified.
    """
    if not isinstance(calibration_data, CalibrationData) or len(calibration_data) == 0:
        raise CalibrationError("report() needs non-empty CalibrationData (sampler inputs)")
    gm = calibrated_graph(quantized, float_model)
    groups: list[tuple[int, Sequence]] = []
    for t in sorted(set(calibration_data.timestep.tolist()), reverse=True):
        rows = torch.nonzero(calibration_data.timestep == t).flatten()[:samples_per_timestep]
        batch = calibration_data.subset(rows).batches(len(rows), shuffle=False)
        groups.append((int(t), list(batch)))
    per_timestep, layers = [], []
    units = reconstruction_units(gm, block_types=())
    with quantizer_mode(gm, "float"):
        for unit in tqdm(units, desc="report", unit="layer", disable=not progress):
            node = unit.layers[0]
            sub, inputs, _ = unit_graph(gm, unit)
            quantizers = layer_quantizers(gm, node)
            values = []
            for t, batches in groups:
                x = capture_unit_inputs(gm, inputs, batches, None)
                with torch.no_grad():
                    fp = sub(*x.values)[0]
                    for q in quantizers:
                        q.enable_fake_quant()
                    q_out = sub(*x.values)[0]
                    for q in quantizers:
                        q.disable_fake_quant()
                first = next(v for v, b in zip(x.values, x.batched) if b)
                value = sqnr_db(fp, q_out)
                values.append((t, value))
                per_timestep.append(
                    {
                        "layer": str(node.target),
                        "timestep": t,
                        "sqnr_db": round(value, 3),
                        "input_min": float(first.min()),
                        "input_max": float(first.max()),
                    }
                )
            spec = node.meta[ANNOTATION_KEY]
            tau = gm.get_submodule(les_scale_name(spec.les_owner)).tau if spec.les_owner else None
            counts = _pts_counts(gm, node)
            worst = min(values, key=lambda tv: tv[1])
            layers.append(
                {
                    "layer": str(node.target),
                    "sqnr_db_mean": round(sum(v for _, v in values) / len(values), 2),
                    "sqnr_db_min": round(worst[1], 2),
                    "worst_timestep": worst[0],
                    "tau": "-"
                    if tau is None
                    else f"{float(tau.min()):.3g}..{float(tau.max()):.3g}",
                    "tau_stats": None
                    if tau is None
                    else (float(tau.min()), float(tau.mean()), float(tau.max())),
                    "pts_exponents": "/".join(map(str, counts)) if counts else "",
                    "pts_counts": counts,
                }
            )
    return QuantReport(per_timestep, layers)
