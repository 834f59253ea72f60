import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quality_benchmark_quick_run_emits_rows():
    """benchmarks/quality.py runs from the checkout and its last line is the documented JSON."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick"]
    cmd += ["--models", "fashion28", "--bits", "w8a8", "w4a6", "--methods", "fp", "minmax"]
    cmd += ["--n", "8", "--per-step", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, check=True)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    keys = {"model", "bits", "method", "fid", "eps_sqnr_db", "psnr_db", "class_acc", "calib_s"}
    assert all(keys <= row.keys() for row in rows)
    by = {(r["method"], r["bits"]): r for r in rows}
    assert set(by) == {("fp", "fp"), ("minmax", "w8a8"), ("minmax", "w4a6")}
    fp = by["fp", "fp"]
    assert fp["eps_sqnr_db"] is None and fp["psnr_db"] is None and fp["class_acc"] is None
    w8, w4 = by["minmax", "w8a8"], by["minmax", "w4a6"]
    # paired metrics rank the bit settings even at 8 samples
    assert w8["eps_sqnr_db"] > w4["eps_sqnr_db"] > 5
    assert w8["psnr_db"] > w4["psnr_db"]
    assert w8["calib_s"] > 0
    # the headline is the mean of the per-step values, one per DDIM step
    for row in (w8, w4):
        steps = row["eps_sqnr_db_steps"]
        assert len(steps) == 20
        assert abs(sum(steps) / len(steps) - row["eps_sqnr_db"]) < 0.01
    assert fp["eps_sqnr_db_steps"] is None
    assert "| fashion28 | w4a6 | minmax |" in out.stdout  # the markdown table for README


def _row(method, seed, eps, steps=None):
    metrics = {"eps_sqnr_db": eps, "psnr_db": eps, "label_agree": 0.5, "fid": 1.0}
    if steps is not None:
        metrics["eps_sqnr_db_steps"] = steps
    return {
        "model": "m",
        "bits": "w4a8",
        "method": method,
        "calib_seed": seed,
        "calib_s": 10,
        **metrics,
    }


def test_seed_spread_pairs_a_lever_with_every_base_that_ran(tmp_path):
    """benchmarks/seed_spread.py: means and spreads per method, per-seed gains over each
    shorter name that ran on the same seeds."""
    logs = []
    for seed, (base, one, both) in enumerate([(30.0, 31.0, 31.5), (31.0, 32.5, 32.0)]):
        steps = [base + 1, base - 1]  # per-step values on the base rows only
        rows = [_row("p", seed, base, steps), _row("p-x", seed, one), _row("p-x-y-z", seed, both)]
        logs.append(tmp_path / f"s{seed}.log")
        logs[-1].write_text("progress line\n" + json.dumps(rows) + "\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "seed_spread.py"), *map(str, logs)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "| m | w4a8 | p | 0,1 | 30.50 (1.00) |" in out
    assert "| m | w4a8 | p-x over p | 0,1 | +1.25 [+1.00, +1.50] |" in out
    assert "| m | w4a8 | p-x-y-z over p-x | 0,1 | +0.00 [-0.50, +0.50] |" in out
    assert "| m | w4a8 | p-x-y-z over p | 0,1 | +1.25 [+1.00, +1.50] |" in out
    assert "over p-x-y " not in out  # no such run: not a base
    # per-step means where the rows have them (p's: steps 31/29 and 32/30), none for the others
    assert "| m | w4a8 | p | 31.5 | 29.5 |" in out
    assert "| m | w4a8 | p-x | 3" not in out.split("step 0")[-1]
