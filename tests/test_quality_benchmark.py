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
    assert "| fashion28 | w4a6 | minmax |" in out.stdout  # the markdown table for README
