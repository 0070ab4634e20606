"""Shared fixtures: the tiny SAM, a small demo dataset and the real-data root (skip when ../shared
is absent)."""

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


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """A small demo dataset (3 COCO val images, 1 DOTA, 2 ADE20K), generated once per session."""
    from ptqbench.demo.install import ensure_demo_data
    from ptqbench.demo.writers import DemoSizes

    sizes = DemoSizes(coco_val=3, coco_train=2, dota_val=1, dota_train=1, ade_val=2, ade_train=2)
    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo", sizes)


@pytest.fixture()
def sam_tiny():
    """A fresh untrained sam_tiny whose relative-position tables are non-zero (so they matter)."""
    from ptqbench.models.sam1.models import build_sam_tiny

    model = build_sam_tiny(seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()
