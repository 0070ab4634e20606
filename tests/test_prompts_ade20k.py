"""`ptqbench prompts ade20k`: SegFormer priors with SSA's preprocessing (random weights, a small
SegformerConfig, no network) on the real ADE20K slice and the demo data; the folder mode=ssa reads."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("transformers", reason="SegFormer needs the 'prompts' extra (transformers)")

from ptqbench.cli import main  # noqa: E402
from ptqbench.errors import CheckpointError  # noqa: E402
from ptqbench.prompts.ade20k import generate_ade20k_priors  # noqa: E402
from ptqbench.prompts.segformer import checkpoint_id, class_maps, load_segformer, preprocess  # noqa: E402
from ptqbench.tasks.ade20k import Ade20kTask, list_samples, read_prior
from ptqbench.tasks.base import TaskConfig
from ptqbench.tasks.images import read_image


@pytest.fixture(scope="module")
def small_config():
    from transformers import SegformerConfig

    return SegformerConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1],
                           decoder_hidden_size=16, num_labels=150)


def _image(realdata):
    return read_image(realdata / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000001.jpg")


def test_preprocessing_is_the_pil_feature_extractors_on_bgr_pixels(realdata):
    image = _image(realdata)
    processors = pytest.importorskip("transformers.models.segformer.image_processing_pil_segformer")
    reference = processors.SegformerImageProcessorPil(size={"height": 512, "width": 512})
    expected = reference(images=np.ascontiguousarray(image[..., ::-1]), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(image, 512, bgr=True), expected, atol=1e-5)
    np.testing.assert_array_equal(preprocess(image, 64, bgr=True), preprocess(image[..., ::-1], 64, bgr=False))
    assert not np.array_equal(preprocess(image, 64, bgr=True), preprocess(image, 64, bgr=False))


def test_class_maps_are_upsampled_to_the_image_with_align_corners(realdata, small_config):
    import torch
    import torch.nn.functional as F

    model, weights = load_segformer("b0", "random", config=small_config)
    assert weights.sha256 == "random-seed0"
    image = _image(realdata)
    small = image[:37, :53]
    maps = class_maps(model, [image, small], 64, torch.device("cpu"))
    assert [m.shape for m in maps] == [image.shape[:2], small.shape[:2]] and maps[0].dtype == np.uint8
    with torch.inference_mode():
        logits = model(pixel_values=torch.from_numpy(preprocess(small, 64))[None]).logits
        expected = F.interpolate(logits, size=small.shape[:2], mode="bilinear", align_corners=True).argmax(1)[0]
    np.testing.assert_array_equal(maps[1], expected.numpy())
    assert int(maps[0].max()) < 150


def test_the_prior_folder_is_what_mode_ssa_reads_and_is_cached(realdata, small_config, tmp_path, caplog):
    kwargs = dict(weights="random", size=64, config=small_config, cache_dir=tmp_path, progress=False, device="cpu")
    made = generate_ade20k_priors(realdata, "validation", "b0", **kwargs)
    samples = list_samples(realdata, "validation")
    assert not made.reused and made.label == "segformer-b0@random-seed0"
    assert sorted(path.name for path in made.path.iterdir()) == [f"{s.stem}.png" for s in samples]
    for sample in samples:
        prior = read_prior(made.path / f"{sample.stem}.png", read_image(sample.image_path).shape[:2])
        assert prior.dtype == np.uint8 and int(prior.max()) < 150
    task = Ade20kTask(TaskConfig(data_root=realdata, options=(("mode", "ssa"), ("semantic_prior", str(made.path)))))
    task.check_eval_inputs()
    caplog.set_level(logging.INFO, logger="ptqbench")
    again = generate_ade20k_priors(realdata, "validation", "b0", **kwargs)
    assert again.reused and again.path == made.path and any("reusing the cached" in m for m in caplog.messages)
    other = {generate_ade20k_priors(realdata, "validation", "b0", **{**kwargs, **change}).path
             for change in ({"size": 32}, {"bgr": False}, {"limit": 2})}
    assert len(other | {made.path}) == 4
    assert made.meta["stems"] == [s.stem for s in samples] and made.meta["identity"]["settings"] == {
        "size": 64, "bgr": True}


def test_cli_on_the_demo_data_copies_the_pngs(small_demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PTQBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "priors"
    argv = ["prompts", "ade20k", "--data-root", str(small_demo), "--segformer", "b0", "--weights", "random",
            "--size", "64", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    stems = [sample.stem for sample in list_samples(small_demo, "validation")]
    assert sorted(path.stem for path in out.iterdir()) == sorted(stems)


@pytest.mark.parametrize("argv, message", [
    (["--segformer", "b9"], "unknown SegFormer variant 'b9'; valid: b0, b1, b2, b3, b4, b5"),
    (["--size", "0"], "--size must be at least 1, got 0"),
    (["--weights", "/nonexistent/segformer"], "SegFormer weights folder /nonexistent/segformer does not exist"),
    (["--split", "testing"], "testing"),
])
def test_bad_input_is_one_line_and_exit_2(realdata, tmp_path, monkeypatch, argv, message, capsys):
    monkeypatch.setenv("PTQBENCH_CACHE", str(tmp_path))
    base = ["prompts", "ade20k", "--data-root", str(realdata), "--segformer", "b0", "--size", "32", "--limit", "1",
            "--device", "cpu"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptqbench: error: ") and message in err and "\n" not in err


def test_offline_without_the_checkpoint_is_one_error_naming_it_and_the_cache(monkeypatch):
    from transformers import SegformerForSemanticSegmentation

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files\nsecond line")

    monkeypatch.setattr(SegformerForSemanticSegmentation, "from_pretrained", offline)
    assert checkpoint_id("b5") == "nvidia/segformer-b5-finetuned-ade-640-640"
    assert checkpoint_id("b2") == "nvidia/segformer-b2-finetuned-ade-512-512"
    with pytest.raises(CheckpointError) as caught:
        load_segformer("b5")
    message = str(caught.value)
    assert "nvidia/segformer-b5-finetuned-ade-640-640" in message and "models--nvidia--segformer-b5" in message
    assert "\n" not in message
