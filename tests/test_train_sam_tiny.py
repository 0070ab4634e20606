"""tools/train_sam_tiny (the package): a 3-step CPU run end to end, and the pieces that re-express
SAM code."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ptqbench.models.sam1.models import build_sam_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train() -> SimpleNamespace:
    """The package's pieces under test, imported as `python3 -m tools.train_sam_tiny` finds them
    (from the repository root)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tools.train_sam_tiny import __main__ as cli
    from tools.train_sam_tiny import prompts, sam_forward, scenes

    return SimpleNamespace(main=cli.main, decode=sam_forward.decode, embed_points=sam_forward.embed_points,
                           mask_boxes=scenes.mask_boxes, prompt_counts=prompts.prompt_counts,
                           jitter_boxes=prompts.jitter_boxes)


def test_three_cpu_steps_write_a_strict_fp16_checkpoint(train: SimpleNamespace, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out, log_dir = tmp_path / "sam_tiny.pt", tmp_path / "logs"
    metrics = train.main(["--out", str(out), "--log-dir", str(log_dir), "--device", "cpu", "--max-steps", "3",
                          "--batch", "2", "--prompts", "3", "--workers", "0", "--val-scenes", "1",
                          "--val-every", "0", "--log-every", "1", "--warmup-steps", "1"])
    rows = list(csv.DictReader(open(log_dir / "train_log.csv")))
    assert [int(row["step"]) for row in rows] == [1, 2, 3]
    assert all(math.isfinite(float(row["loss"])) and float(row["loss"]) > 0 for row in rows)
    # SAM's loss at init: dice near 1, so 20 focal + dice + iou_mse is about 1 + 20 * focal.
    assert all(0.5 < float(row["dice"]) <= 1.0 for row in rows)

    sha256 = hashlib.sha256(out.read_bytes()).hexdigest()
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"sha256 {sha256}"
    assert metrics["steps"] == 3 and metrics["sha256"] == sha256
    assert json.loads((log_dir / "metrics.json").read_text())["sha256"] == sha256
    val = list(csv.DictReader(open(log_dir / "val_log.csv")))
    assert len(val) == 1 and all(0.0 <= float(val[0][f"miou_{f}"]) <= 100.0 for f in ("coco", "dota", "ade"))

    assert out.stat().st_size <= 16_000_000
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert all(value.dtype == torch.float16 for value in state.values() if value.is_floating_point())
    model = build_sam_tiny()
    model.load_state_dict(state, strict=True)
    init = build_sam_tiny().state_dict()
    changed = max((value.float() - init[key]).abs().max().item() for key, value in state.items())
    assert changed > 1e-4  # three AdamW steps at lr ~1e-3 moved the weights


def test_batched_decode_equals_sam_predict_masks(train: SimpleNamespace) -> None:
    model = build_sam_tiny().eval()
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn((1, 256, 16, 16), generator=generator)
    boxes = torch.tensor([[10.0, 20.0, 100.0, 90.0], [0.0, 0.0, 255.0, 200.0], [50.0, 60.0, 52.0, 63.0]])
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
        image_pe = model.prompt_encoder.get_dense_pe()
        expected = model.mask_decoder.predict_masks(embedding, image_pe, sparse, dense)
        no_mask = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        got = train.decode(model.mask_decoder, embedding.expand(3, -1, -1, -1), image_pe, sparse, no_mask)
    assert got[0].shape == (3, 4, 64, 64) and got[1].shape == (3, 4)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def test_point_embedding_equals_the_prompt_encoder(train: SimpleNamespace) -> None:
    encoder = build_sam_tiny().prompt_encoder
    points = torch.tensor([[[3.0, 4.0], [100.0, 7.0], [255.0, 255.0]], [[0.0, 0.0], [17.0, 200.0], [9.0, 9.0]]])
    labels = torch.tensor([[1, 0, 1], [0, 0, 1]])
    with torch.no_grad():
        expected, _ = encoder(points=(points, labels), boxes=None, masks=None)
        got = train.embed_points(encoder, points, labels)
    assert got.shape == (2, 4, 256)
    torch.testing.assert_close(got, expected)


def test_mask_boxes_use_pixel_edges(train: SimpleNamespace) -> None:
    masks = np.zeros((2, 8, 10), dtype=bool)
    masks[0, 2:5, 3:7] = True          # rows 2..4, columns 3..6
    masks[1, 7, 9] = True              # the bottom-right pixel
    np.testing.assert_array_equal(train.mask_boxes(masks), [[3, 2, 7, 5], [9, 7, 10, 8]])


def test_prompt_shares(train: SimpleNamespace) -> None:
    assert train.prompt_counts(16) == (8, 6, 2)
    assert train.prompt_counts(3) == (1, 1, 1)
    assert train.prompt_counts(1) == (1, 0, 0)


def test_box_jitter_is_bounded_and_stays_in_the_image(train: SimpleNamespace) -> None:
    generator = torch.Generator().manual_seed(0)
    tight = torch.tensor([[10.0, 10.0, 210.0, 110.0]]).repeat(2000, 1)
    scale = torch.full((2000,), 0.5)
    hw = torch.tensor([[150, 256]]).repeat(2000, 1)
    noisy = train.jitter_boxes(tight, scale, hw, generator)
    moved = (noisy - tight).abs()
    assert moved.max() <= 10.0 + 1e-4     # 20 original pixels at scale 0.5
    assert 0.15 < (moved.sum(dim=1) == 0).float().mean() < 0.35   # EXACT_BOX_SHARE left tight
    assert (noisy[:, 0] >= 0).all() and (noisy[:, 1] >= 0).all()
    assert (noisy[:, 2] <= 256).all() and (noisy[:, 3] <= 150).all()
    assert ((noisy[:, 2] - noisy[:, 0]) >= 1).all() and ((noisy[:, 3] - noisy[:, 1]) >= 1).all()
    # std 10% of the side: 20 px for x (clipped at 10), 10 px for y (clipped at 10)
    assert 3.0 < moved[moved[:, 1] > 0][:, 1].mean() < 8.0
