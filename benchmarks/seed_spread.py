"""Mean and spread over calibration seeds of quality.py rows.

    python benchmarks/seed_spread.py LOG [LOG ...]

Each LOG is the output of one ``python benchmarks/quality.py ... --calib-seed S`` run (its last
line is the JSON list of rows). Rows are grouped by model, bits and method; for each group and
paired metric (eps-SQNR, PSNR, label agreement, FID) the table gives the mean, the spread (max -
min) and the seeds it covers, and for every method with a ``<base>-<lever>`` name whose base
ran on the same seeds (every shorter ``-``-separated prefix that ran: ``a-b-c`` against ``a-b``
and ``a``), the per-seed difference of the lever from its base (mean, min, max; for
FID lower is better, so a gain is negative there): a lever's gain counts only where it holds on
every seed. Last, where the rows carry them, each group's per-step eps-SQNR (mean over its
seeds, noisiest sampling step first): where along the sampling the error sits.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = ("eps_sqnr_db", "psnr_db", "label_agree", "fid")
DIGITS = {"eps_sqnr_db": 2, "psnr_db": 2, "label_agree": 3, "fid": 1}


def read_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        lines = Path(path).read_text().strip().splitlines()
        if not lines or not lines[-1].startswith("["):
            raise SystemExit(f"{path}: no quality.py JSON on its last line (did the run finish?)")
        rows.extend(r for r in json.loads(lines[-1]) if r["method"] != "fp")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+")
    args = ap.parse_args()
    groups: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for row in read_rows(args.logs):
        groups[(row["model"], row["bits"], row["method"])][row["calib_seed"]] = row
    print("| model | bits | method | seeds | " + " | ".join(f"{m} mean (spread)" for m in METRICS)
          + " | calib_s mean |")  # fmt: skip
    print("|---" * (5 + len(METRICS)) + "|")
    for (model, bits, method), by_seed in sorted(groups.items()):
        cells = []
        for m in METRICS:
            values = [r[m] for r in by_seed.values()]
            d = DIGITS[m]
            cells.append(f"{statistics.mean(values):.{d}f} ({max(values) - min(values):.{d}f})")
        calib = statistics.mean(r["calib_s"] for r in by_seed.values())
        seeds = ",".join(str(s) for s in sorted(by_seed))
        print(f"| {model} | {bits} | {method} | {seeds} | " + " | ".join(cells)
              + f" | {calib:.0f} |")  # fmt: skip
    print()
    print("| model | bits | lever over base | seeds | "
          + " | ".join(f"{m} gain mean [min, max]" for m in METRICS) + " |")  # fmt: skip
    print("|---" * (4 + len(METRICS)) + "|")
    for (model, bits, method), by_seed in sorted(groups.items()):
        for base, base_rows, seeds in _bases(groups, model, bits, method):
            print_gains(model, bits, method, base, by_seed, base_rows, seeds)
    print_steps(groups)


def step_means(by_seed: dict[int, dict]) -> list[float] | None:
    """The per-step eps-SQNR averaged over the seeds (None where a row lacks it: older logs)."""
    steps = [r.get("eps_sqnr_db_steps") for r in by_seed.values()]
    if not steps or any(s is None for s in steps) or len({len(s) for s in steps}) != 1:
        return None
    return [statistics.mean(values) for values in zip(*steps)]


def print_steps(groups: dict) -> None:
    means = {key: step_means(by_seed) for key, by_seed in sorted(groups.items())}
    means = {key: m for key, m in means.items() if m is not None}
    if not means:
        return
    count = max(len(m) for m in means.values())
    print()
    print("| model | bits | method | " + " | ".join(f"step {i}" for i in range(count)) + " |")
    print("|---" * (3 + count) + "|")
    for (model, bits, method), m in means.items():
        print(f"| {model} | {bits} | {method} | " + " | ".join(f"{v:.1f}" for v in m) + " |")


def _bases(groups: dict, model: str, bits: str, method: str):
    """Every method whose name is a ``-``-separated prefix of ``method`` and that ran on some
    of its seeds, longest first: ``a-b-c`` is compared with ``a-b`` and ``a``."""
    parts = method.split("-")
    for cut in range(len(parts) - 1, 0, -1):
        base = "-".join(parts[:cut])
        base_rows = groups.get((model, bits, base))
        if base_rows:
            seeds = sorted(set(groups[(model, bits, method)]) & set(base_rows))
            if seeds:
                yield base, base_rows, seeds


def print_gains(model, bits, method, base, by_seed, base_rows, seeds) -> None:
    """One row of per-seed differences of ``method`` from ``base``."""
    cells = []
    for m in METRICS:
        gains = [by_seed[s][m] - base_rows[s][m] for s in seeds]
        d = DIGITS[m]
        cells.append(f"{statistics.mean(gains):+.{d}f} [{min(gains):+.{d}f}, {max(gains):+.{d}f}]")
    print(f"| {model} | {bits} | {method} over {base} | {','.join(map(str, seeds))} | "
          + " | ".join(cells) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
