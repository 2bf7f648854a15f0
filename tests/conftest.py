"""Suite-wide isolation: what one test module does to the process environment stays in that module."""

from __future__ import annotations

import os

import pytest
from helpers import COMMON_TINY_RUN, run_cli


@pytest.fixture(scope="module", autouse=True)
def restore_environment():
    """In-process engines set RANK, WORLD_SIZE, MASTER_ADDR, ... (DeepSpeed's init_distributed does); a later
    module that runs `pretrain` as one plain process must not see a half-set launcher environment."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """-m slow for the in-process equivalence at world 4 in fp32: fp64 at world 4 holds the sharding to 1e-10, and
    fp32 (the rounding-noise rules) runs at world 1 and 2; the pair of a fixture parameter and a test parameter can
    not be marked where either is declared."""
    for item in items:
        if getattr(item, "originalname", "") == "test_engine_matches_oracle" and "'fp32')" in item.name \
                and item.name.endswith("-4]"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """One tiny pretraining run (one step, its resumable folder and reference file), read, never written, by the
    evaluation and fine-tuning tests."""
    out = tmp_path_factory.mktemp("pre") / "run"
    res = run_cli(["pretrain", *COMMON_TINY_RUN, "--output-dir", str(out)])
    assert res.returncode == 0, res.stderr[-2000:]
    return out
