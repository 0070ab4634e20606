"""`ptqbench prompts coco`: torchvision detectors (random weights, tiny inputs, no network) on the
real COCO slice and the demo data; the file format `--prompts` reads, the cache, bad inputs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from ptqbench.cli import main
from ptqbench.errors import CheckpointError, ConfigError
from ptqbench.prompts.coco import generate_coco_prompts, select_image_ids
from ptqbench.prompts.zoo import DETECTORS, DetectorSettings, parse_detector_options
from ptqbench.tasks.coco import load_split
from ptqbench.tasks.prompts import read_coco_detections

# Tiny inputs keep a random-weight detector pass at about a second per image on one core.
TINY = DetectorSettings(score_threshold=0.3, min_size=96, max_size=128, batch_size=2)
TINY_FLAGS = ["--weights", "random", "--score-threshold", "0.3", "--min-size", "96", "--max-size", "128",
              "--batch-size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def real_prompts(realdata, tmp_path_factory):
    """Random-weight Faster R-CNN prompts on the first 3 real val2017 images, and the cache folder."""
    cache = tmp_path_factory.mktemp("prompt-cache")
    made = generate_coco_prompts(realdata, "val2017", "fasterrcnn_resnet50_fpn", weights="random", settings=TINY,
                                 limit=3, device="cpu", progress=False, cache_dir=cache)
    return made, cache


def test_the_file_is_a_coco_detection_file_that_prompts_reads(realdata, real_prompts):
    made, _ = real_prompts
    assert not made.reused and made.label == "fasterrcnn_resnet50_fpn@random-seed0"
    entries = json.loads(made.path.read_text())
    split = load_split(realdata, "val2017")
    first_three = sorted(split.image_ids)[:3]
    assert entries and {entry["image_id"] for entry in entries} <= set(first_three)
    for entry in entries:
        assert set(entry) == {"image_id", "category_id", "bbox", "score"}
        assert entry["category_id"] in split.category_ids and entry["score"] > TINY.score_threshold
        x, y, w, h = entry["bbox"]
        info = split.coco.imgs[entry["image_id"]]
        assert w >= 0 and h >= 0 and x >= 0 and y >= 0 and x + w <= info["width"] + 1e-3
        assert y + h <= info["height"] + 1e-3
    per_image = read_coco_detections(made.path, split.coco.imgs.keys(), split.category_ids)
    for detections in per_image.values():
        assert len(detections) <= TINY.max_per_image
        assert list(detections.scores) == sorted(detections.scores, reverse=True)
    assert made.meta["image_ids"] == first_three and made.meta["boxes"] == len(entries)
    assert made.meta["identity"]["settings"] == TINY.as_dict() and made.meta["images_per_second"] > 0


def test_a_second_run_reuses_the_cache_and_other_settings_do_not(realdata, real_prompts, caplog, monkeypatch):
    made, cache = real_prompts
    caplog.set_level(logging.INFO, logger="ptqbench")
    import ptqbench.prompts.coco as coco_prompts

    def no_parse(*args, **kwargs):
        raise AssertionError("a cache hit parses no annotation file")

    with monkeypatch.context() as patch:
        patch.setattr(coco_prompts, "load_split", no_parse)
        start = time.perf_counter()
        again = generate_coco_prompts(realdata, "val2017", "fasterrcnn_resnet50_fpn", weights="random",
                                      settings=TINY, limit=3, device="cpu", progress=False, cache_dir=cache)
    assert again.reused and again.path == made.path and time.perf_counter() - start < 1.0
    assert any("reusing the cached fasterrcnn_resnet50_fpn prompts" in message for message in caplog.messages)
    from ptqbench.prompts.cache import entry_for
    from ptqbench.prompts.coco import _identity

    base = _identity("fasterrcnn_resnet50_fpn", made.weights, "val2017", made.meta["identity"]["data"], 3, TINY)
    assert entry_for(cache / "coco", "val2017-fasterrcnn_resnet50_fpn", base, ".json").path == made.path
    keys = {entry_for(cache, "x", base).path}
    for changed in ({**base, "detector": "fcos_resnet50_fpn"}, {**base, "weights_sha256": "0" * 64},
                    {**base, "split": "train2017"}, {**base, "data": "other"}, {**base, "images": 2},
                    {**base, "settings": parse_detector_options((("nms", "0.6"),), TINY).as_dict()},
                    {**base, "settings": {**TINY.as_dict(), "batch_size": 1}}):
        keys.add(entry_for(cache, "x", changed).path)
    assert len(keys) == 8
    split = load_split(realdata, "val2017")
    assert select_image_ids(split, first=2) == split.image_ids[:2] != sorted(split.image_ids)[:2]
    other = generate_coco_prompts(realdata, "val2017", "fasterrcnn_resnet50_fpn", weights="random", settings=TINY,
                                  first=2, device="cpu", progress=False, cache_dir=cache)
    assert not other.reused and other.meta["image_ids"] == split.image_ids[:2]


def test_cli_on_the_demo_split_writes_out_and_reuses(small_demo, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("PTQBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "dets.json"
    argv = ["prompts", "coco", "--data-root", str(small_demo), "--detector", "fcos_resnet50_fpn", "--out", str(out),
            *TINY_FLAGS]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    (cached,) = (tmp_path / "cache" / "prompts" / "coco").glob("val2017-fcos_resnet50_fpn-" + "?" * 16 + ".json")
    assert json.loads(cached.with_name(cached.name + ".meta.json").read_text())["boxes"] >= 0
    assert out.read_bytes() == cached.read_bytes()
    split = load_split(small_demo, "val2017")
    read_coco_detections(out, split.coco.imgs.keys(), split.category_ids)  # the demo's 8 categories only
    caplog.set_level(logging.INFO, logger="ptqbench")
    assert main(argv[:-len(TINY_FLAGS) - 2] + TINY_FLAGS) == 0  # no --out: the cached file's path
    assert capsys.readouterr().out.strip() == str(cached)
    assert any("reusing the cached" in message for message in caplog.messages)
    # a cache hit is instant: it imports no torch (nor torchvision)
    code = ("import sys; from ptqbench.cli import main; code = main(" + repr(argv[:-len(TINY_FLAGS) - 2] + TINY_FLAGS)
            + "); print(code, 'torch' in sys.modules, 'torchvision' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PTQBENCH_CACHE": str(tmp_path / "cache")})
    assert done.stdout.split()[-3:] == ["0", "False", "False"], done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--detector", "fasterrcnn"], "unknown detector 'fasterrcnn'. Did you mean 'fasterrcnn_resnet50_fpn'?"),
    (["--score-threshold", "1.5"], "score_threshold must lie in [0, 1], got 1.5"),
    (["--batch-size", "0"], "batch_size must be at least 1"),
    (["--min-size", "200", "--max-size", "100"], "min_size (200) exceeds max_size (100)"),
    (["--limit", "2", "--first", "2"], "--limit (first images by id) and --first"),
    (["--weights", "/nonexistent/w.pth"], "detector weights file /nonexistent/w.pth does not exist"),
    (["--split", "val2099"], "instances_val2099.json does not exist"),
    (["--data-root", "/nonexistent/data"], "data root /nonexistent/data does not exist"),
    (["--out", "{file}/dets.json"], "--out {file}/dets.json cannot be written"),
])
def test_bad_input_is_one_line_and_exit_2(realdata, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PTQBENCH_CACHE", str(tmp_path))  # nothing may reach the user's cache
    (tmp_path / "file").write_text("not a folder")
    argv = [arg.replace("{file}", str(tmp_path / "file")) for arg in argv]
    message = message.replace("{file}", str(tmp_path / "file"))
    # a case that wrongly passed would detect one tiny image, not the split
    defaults = ["prompts", "coco", "--data-root", str(realdata), *TINY_FLAGS, "--limit", "1"]
    assert main(defaults + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptqbench: error: ") and message in err and "\n" not in err


def test_an_unknown_detector_is_answered_without_importing_torch():
    code = ("import sys; from ptqbench.cli import main; code = main(['prompts', 'coco', '--detector', 'yolo']); "
            "print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["2", "False"] and "unknown detector 'yolo'" in done.stderr


def test_offline_without_the_weights_file_is_one_error_naming_file_and_folder(tmp_path, monkeypatch):
    import urllib.error

    import torch

    from ptqbench.prompts.weights import resolve_weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    for name in DETECTORS:
        with pytest.raises(CheckpointError) as caught:
            resolve_weights(name, None, progress=False)
        message = str(caught.value)
        assert f"{name}_coco-" in message and str(tmp_path / "hub" / "checkpoints") in message
        assert "https://download.pytorch.org/models/" in message and "\n" not in message


def test_a_local_state_dict_is_loaded_and_hashed(tmp_path):
    import torch

    from ptqbench.prompts.weights import build_detector, file_sha256, resolve_weights

    random = resolve_weights("retinanet_resnet50_fpn_v2", "random")
    model = build_detector("retinanet_resnet50_fpn_v2", random, TINY)
    path = tmp_path / "retinanet.pth"
    torch.save(model.state_dict(), path)
    local = resolve_weights("retinanet_resnet50_fpn_v2", str(path))
    assert local.sha256 == file_sha256(path) and local.source == f"file:{path}"
    loaded = build_detector("retinanet_resnet50_fpn_v2", local, TINY)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    torch.save({"head.nothing": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="do not fit the model"):
        build_detector("retinanet_resnet50_fpn_v2", resolve_weights("retinanet_resnet50_fpn_v2", str(path)), TINY)


def test_detector_options_are_checked():
    assert parse_detector_options((("score-threshold", "0.1"), ("max_per_image", "5"))) == DetectorSettings(
        score_threshold=0.1, max_per_image=5)
    with pytest.raises(ConfigError, match="unknown detector option 'iou'; valid options: score_threshold"):
        parse_detector_options((("iou", "0.5"),))
    with pytest.raises(ConfigError, match="max_per_image='many': expected an integer"):
        parse_detector_options((("max_per_image", "many"),))
    assert DetectorSettings().builder_kwargs("fcos_resnet50_fpn") == {
        "score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 100, "min_size": 800, "max_size": 1333}
