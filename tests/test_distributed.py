"""Data-parallel runs under torchrun (gloo on the CPU): sharding, gathering, the sealed-state
transfer, and a 2-process grid that matches a 1-process run exactly."""

from __future__ import annotations

import csv
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ptqbench.config import BitSpec
from ptqbench.demo.install import ensure_demo_data
from ptqbench.demo.writers import DemoSizes
from ptqbench.distributed import DistributedContext, shard_of
from ptqbench.errors import PtqbenchError
from ptqbench.methods.minmax import MinMax
from ptqbench.models.sam1.calibration import build_calibration_set, sam_forward
from ptqbench.models.sam1.models import build_sam_tiny
from ptqbench.models.sam1.quantized import quantize_sam
from ptqbench.quant.layers import QuantWeightLayer
from ptqbench.quant.sealed_state import load_sealed_state, sealed_state
from ptqbench.quant.sites import quantizer_sites, seal_for_evaluation, weight_layers
from ptqbench.tasks.base import STATISTICS_FILE
from ptqbench.tasks.gallery import GALLERY_DIR
from ptqbench.types import CalibrationItem

REPO = Path(__file__).resolve().parents[1]
SMALL = DemoSizes(coco_val=3, coco_train=2, dota_val=2, dota_train=1, ade_val=3, ade_train=2)


def _env() -> dict[str, str]:
    """One thread per process in every run (CPU matmul results depend on the thread count)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]


def test_shard_of_gives_contiguous_blocks_in_rank_order():
    items = list(range(10))
    blocks = [shard_of(items, rank, 3) for rank in range(3)]
    assert blocks == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [shard_of(range(2), rank, 3) for rank in range(3)] == [[0], [1], []]
    assert shard_of(range(5), 0, 1) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        shard_of(items, 2, 2)


def test_single_process_context_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = DistributedContext.from_env(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    assert ctx.shard(range(3)) == [0, 1, 2]
    assert ctx.gather_to_main([(0, "a"), (1, "b")]) == [(0, "a"), (1, "b")]
    assert ctx.broadcast_from_main({"x": 1}) == {"x": 1}
    assert ctx.main_first(lambda: 7) == 7
    ctx.barrier()
    ctx.destroy()


GATHER_SCRIPT = """
import json, sys
import torch
from ptqbench.distributed import DistributedContext

ctx = DistributedContext.from_env(torch.device("cpu"))
indices = ctx.shard(list(range(7)))
gathered = ctx.gather_to_main([(index, f"image-{index}", ctx.rank) for index in indices])
tensor = ctx.broadcast_from_main(torch.arange(3.0) * 2 if ctx.is_main else torch.zeros(1))
flag = ctx.broadcast_from_main(ctx.rank == 0)
with open(f"{sys.argv[1]}.{ctx.rank}", "w") as out:
    json.dump({"world": ctx.world_size, "main": ctx.is_main, "indices": indices, "gathered": gathered,
               "tensor": tensor.tolist(), "flag": flag}, out)
ctx.destroy()
"""


def test_gather_to_main_keeps_image_order_across_three_ranks(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    done = subprocess.run(_torchrun(3) + [str(script), str(tmp_path / "seen")], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"seen.{rank}").read_text()) for rank in range(3)]
    assert [s["indices"] for s in seen] == [[0, 1, 2], [3, 4], [5, 6]]
    assert seen[0]["gathered"] == [[0, "image-0", 0], [1, "image-1", 0], [2, "image-2", 0],
                                   [3, "image-3", 1], [4, "image-4", 1], [5, "image-5", 2], [6, "image-6", 2]]
    assert seen[1]["gathered"] == seen[2]["gathered"] == []
    assert [s["tensor"] for s in seen] == [[0.0, 2.0, 4.0]] * 3
    assert [s["flag"] for s in seen] == [True] * 3
    assert [(s["world"], s["main"]) for s in seen] == [(3, True), (3, False), (3, False)]


def _calibrated_tiny() -> tuple[torch.nn.Module, torch.nn.Module, list]:
    """sam_tiny W4A6 after minmax, with one softmax site on the log2 grid and one site off."""
    rng = np.random.default_rng(0)
    items = [CalibrationItem(image=rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
                             boxes=np.array([[4.0, 6.0, 40.0, 30.0]])) for _ in range(2)]
    model = build_sam_tiny()
    calib = build_calibration_set(model, items, "cpu")
    qmodel = quantize_sam(model, 4, 6)
    MinMax().calibrate(qmodel, model, calib, BitSpec(4, 6), 0)
    sites = quantizer_sites(qmodel)
    sites["image_encoder.blocks.1.attn.softmax"].set_log2(2, torch.tensor(0.5))
    sites["mask_decoder.transformer.layers.0.self_attn.q"].mode = "off"
    seal_for_evaluation(qmodel, fp_sites=("mask_decoder.transformer.layers.0.self_attn.q",))
    return model, qmodel, list(calib.samples)


@pytest.fixture
def one_thread():
    """Torch on one thread for this test (fast on a loaded 2-core machine); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sealed_state_loaded_into_a_fresh_twin_computes_the_same(one_thread):
    model, qmodel, calib = _calibrated_tiny()
    state = sealed_state(qmodel)
    assert all(value.device.type == "cpu" for value in state.state_dict.values())
    twin = quantize_sam(build_sam_tiny(), 4, 6)
    load_sealed_state(twin, state)

    for name, quantizer in quantizer_sites(twin).items():
        original = quantizer_sites(qmodel)[name]
        for attr in ("bits", "mode", "log2_tau", "quantize_prob", "channel_axis"):
            assert getattr(quantizer, attr) == getattr(original, attr), (name, attr)
        assert torch.equal(quantizer.scale, original.scale) and torch.equal(quantizer.zero_point, original.zero_point)
    assert quantizer_sites(twin)["image_encoder.blocks.1.attn.softmax"].log2_tau == 2
    assert quantizer_sites(twin)["mask_decoder.transformer.layers.0.self_attn.q"].mode == "off"
    assert quantizer_sites(twin)["image_encoder.blocks.0.attn.qkv.weight"].scale.shape == (3 * 192,)
    layers = weight_layers(twin)
    assert all(isinstance(layer, QuantWeightLayer) for layer in layers.values())
    for path, layer in weight_layers(qmodel).items():
        assert torch.equal(layers[path].frozen_weight, layer.frozen_weight), path
    assert not twin.training and not any(p.requires_grad for p in twin.parameters())

    sample = calib[0]
    with torch.no_grad():
        expected = sam_forward(qmodel, sample.image, sample.boxes)
        twin_out = sam_forward(twin, sample.image, sample.boxes)
        fp = sam_forward(model, sample.image, sample.boxes)
    assert all(torch.equal(a, b) for a, b in zip(expected, twin_out))
    assert not torch.equal(expected[0], fp[0])

    with pytest.raises(PtqbenchError, match="quantizers differ"):
        load_sealed_state(build_sam_tiny(), state)


def _start(argv: list[str], out: Path, data: Path) -> subprocess.Popen:
    """Start `ptqbench run` on the small grid; its stdout + stderr go to `out`.log."""
    args = ["run", "--data-root", str(data), "--tasks", "coco,dota,ade20k", "--methods", "minmax", "--bits", "8",
            "--calib-size", "2", "--device", "cpu", "--out", str(out)]
    with open(f"{out}.log", "w") as log:
        return subprocess.Popen(argv + ["-m", "ptqbench"] + args, env=_env(), cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, out: Path) -> str:
    process.wait(timeout=300)
    log = Path(f"{out}.log").read_text()
    assert process.returncode == 0, log[-3000:]
    return log


def _metric_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    timing = ("calib_s", "eval_s")
    return [{key: value for key, value in row.items() if key not in timing} for row in rows]


def test_two_ranks_match_one_process_and_only_rank_0_writes(tmp_path):
    data = ensure_demo_data(tmp_path / "demo", SMALL)
    one, two = _start([sys.executable], tmp_path / "one", data), _start(_torchrun(2), tmp_path / "two", data)
    single_log, log = _finish(one, tmp_path / "one"), _finish(two, tmp_path / "two")

    for task in ("coco", "dota", "ade20k"):
        board_one = _metric_rows(tmp_path / "one" / f"leaderboard_{task}.csv")
        board_two = _metric_rows(tmp_path / "two" / f"leaderboard_{task}.csv")
        assert [(r["method"], r["bits"]) for r in board_two] == [("fp", "fp"), ("minmax", "W8A8")]
        assert board_two == board_one, task
    assert _metric_rows(tmp_path / "two" / "leaderboard_ade20k.csv")[0]["mIoU"] != "0.0000"
    # The per-image artefacts (COCO RLEs and scores, DOTA Task1 lines, ADE20K label PNGs, each cell's
    # per-image statistics and gallery drawings) agree byte for byte.
    runs_one, runs_two = tmp_path / "one" / "runs", tmp_path / "two" / "runs"
    files = sorted(path.relative_to(runs_one) for path in runs_one.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(runs_two) for path in runs_two.rglob("*") if path.is_file())
    predictions = [path for path in files if path.parent.name != GALLERY_DIR and path.name != STATISTICS_FILE]
    assert len(predictions) == 2 * (1 + 15 + 3)
    assert sum(path.name == STATISTICS_FILE for path in files) == 2 * 3
    assert {path.parts[0] for path in files if path.parent.name == GALLERY_DIR} == {path.parts[0] for path in files}
    assert all((runs_one / name).read_bytes() == (runs_two / name).read_bytes() for name in files)

    # Each cell was stored once (a second writer's INSERT OR REPLACE would raise the rowids).
    rows = sqlite3.connect(tmp_path / "two" / "ptqbench.sqlite").execute(
        "SELECT rowid, task, method, device, images FROM runs ORDER BY rowid").fetchall()
    assert rows == [(1, "coco", "fp", "cpu x2", 3), (2, "coco", "minmax", "cpu x2", 3),
                    (3, "dota", "fp", "cpu x2", 2), (4, "dota", "minmax", "cpu x2", 2),
                    (5, "ade20k", "fp", "cpu x2", 3), (6, "ade20k", "minmax", "cpu x2", 3)]
    # Rank 1 logs at WARNING only (every INFO line comes from rank 0, once) and shows no progress
    # bar: the COCO bars are all of rank 0's 2-image shard, none of rank 1's 1-image shard.
    assert "[rank 1] INFO" not in log
    assert log.count("ptqbench.harness: task coco:") == 1 == single_log.count("ptqbench.harness: task coco:")
    assert set(re.findall(r"coco val2017: +\d+%\|[^|]*\| \d+/(\d+) ", log)) == {"2"}
    assert set(re.findall(r"coco val2017: +\d+%\|[^|]*\| \d+/(\d+) ", single_log)) == {"3"}
