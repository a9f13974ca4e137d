"""`bash bench/gpu_suite.sh --smoke` runs every step of the GPU suite, tiny, and passes on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_suite_smoke_runs_every_step(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--smoke"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    for step in ("machine", "build cuda_ext", "tests:", "decode benchmark grid", "done: exit status 0"):
        assert f"== {step}" in proc.stdout, step
    assert "pytest exit status: 0" in proc.stdout
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert result, "the benchmark wrote no results"


def test_gpu_suite_rejects_unknown_flags(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--nope"],
                          env=dict(os.environ, OUT=str(tmp_path)), cwd=REPO, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 2 and "usage" in proc.stderr
