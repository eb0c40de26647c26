"""`python benchmarks/bench.py --quick` end to end on its two cheapest rows: the matmul peak and the registry's
import and load (2,000 synthesised HH pairs), in a subprocess, writing the results files to a temporary folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"


@pytest.mark.skipif(not HH.exists(), reason="needs the shared HH file (../shared/data)")
def test_quick_bench_on_two_rows(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--rows", "gemm,registry"]
    done = subprocess.run(
        command + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[1/2] gemm: ok" in done.stdout and "[2/2] registry: ok" in done.stdout
    [path] = tmp_path.glob("*-quick.json")
    data = json.loads(path.read_text())
    assert data["quick"] is True and list(data["rows"]) == ["gemm", "registry"]
    peaks = data["rows"]["gemm"]["details"]["peaks"]["fp32"]
    assert all(value > 0 for value in peaks.values())
    imported, loaded = data["rows"]["registry"]["figures"]
    assert imported["metric"] == "import 2,000 pairs" and imported["ours"] > 0 and imported["target"] == "ours < 15"
    assert data["rows"]["registry"]["details"]["rows"] == 2000  # every synthesised pair imported, none a duplicate
    assert loaded["ours"] > 0
    markdown = path.with_suffix(".md").read_text()
    assert "QUICK" in markdown and "| Registry import and load | import 2,000 pairs, s (at 2,000 pairs" in markdown
