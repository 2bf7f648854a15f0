"""scripts/gpu_check.sh --dry-run: every stage on the CPU with tiny shapes, every table written (slow: ~3 min)."""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers import BIN, REPO

TABLES = ("equivalence", "bench_vit", "bench_resnet", "hot_path", "chunking", "finetune", "data")


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": str(BIN / "python"), "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in TABLES:
        lines = (tmp_path / f"{name}.md").read_text().splitlines()
        rows = [line for line in lines if line.startswith("|") and not line.startswith("|---")][1:]
        assert rows, (name, lines)
        assert not [r for r in rows if "error" in r or "failed" in r], (name, rows)
    assert "gpu_check: tables in" in (tmp_path / "log.txt").read_text()
