"""Shared fixtures: the tiny SAM and the real-data root (skip when ../shared is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip("../shared/realdata is absent")
    return REALDATA


@pytest.fixture()
def sam_tiny():
    """A fresh untrained sam_tiny whose relative-position tables are non-zero (so they matter)."""
    from ptqbench.sam.models import build_sam_tiny

    model = build_sam_tiny(seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()
