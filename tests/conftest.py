"""Suite-wide isolation: what one test module does to the process environment stays in that module."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module", autouse=True)
def restore_environment():
    """In-process engines set RANK, WORLD_SIZE, MASTER_ADDR, ... (DeepSpeed's init_distributed does); a later
    module that runs `pretrain` as one plain process must not see a half-set launcher environment."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
