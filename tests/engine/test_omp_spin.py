"""The short OpenMP spin default: set by importing ``engine`` before torch loads; an explicit value wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _spin_seen_by_child(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if env_value is not None:
        env["GOMP_SPINCOUNT"] = env_value
    code = "import engine, torch, os; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_engine_import_sets_short_spin_before_torch():
    from engine import OMP_SPIN_DEFAULT

    assert _spin_seen_by_child(None) == OMP_SPIN_DEFAULT


def test_explicit_spin_count_wins():
    assert _spin_seen_by_child("123456") == "123456"
