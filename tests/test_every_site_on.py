"""Every quantizer on at evaluation, enforced (the benchmark's fairness rule).

Each registered method runs one real harness cell (`ptqbench run`: sam_tiny, one demo COCO image
to calibrate and one to evaluate, `fast` preset, W4A4). Hooks on every quantization site record
what the evaluation forward does: every activation site quantizes every element (mode
"quantize", quantize_prob 1, no observer), every weight is quantized once and frozen with its
site quantizing, and a second evaluation computes every site's output bit for bit again. The
FP row runs the same forward through `fp_twin`, every site off. Methods registered here check the
seal itself: a method leaving a site off is refused unless it declares the site in `fp_sites`,
and QDrop's random bypass left at test time (the published leak) is removed by the seal.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ptqbench.cli import main
from ptqbench.demo.install import ensure_demo_data
from ptqbench.demo.writers import DemoSizes
from ptqbench.errors import SealError
from ptqbench.harness import Harness
from ptqbench.methods.base import METHODS
from ptqbench.methods.minmax import MinMax
from ptqbench.models.sam1.models import build_sam_tiny
from ptqbench.models.sam1.quantized import quantize_sam
from ptqbench.quant.layers import QuantWeightLayer
from ptqbench.quant.quantizer import FakeQuantizer
from ptqbench.quant.sites import quantizer_sites, seal_for_evaluation, site_name, weight_layers

ONE_IMAGE = DemoSizes(coco_val=1, coco_train=1, dota_val=1, dota_train=1, ade_val=1, ade_train=1)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BUILT_IN = [name for name in METHODS.names() if name != "fp"]  # "fp" is the FP row, run in every test
KEPT_OFF = "mask_decoder.transformer.layers.0.self_attn.q"


@dataclass
class Evaluation:
    """What one evaluation forward did at every quantization site.

    activation_sites / weight_layers: every activation site and weight layer of the model.
    calls: (site, mode, quantize_prob, observer attached) of each activation-site call.
    weight_calls: (layer, weight frozen, weight site mode, its quantize_prob) of each weight-layer call.
    outputs: (site, sha1 of the output bytes) of each activation-site call, in call order.
    """

    activation_sites: set[str]
    weight_layers: set[str]
    calls: list[tuple[str, str, float, bool]] = field(default_factory=list)
    weight_calls: list[tuple[str, bool, str, float]] = field(default_factory=list)
    outputs: list[tuple[str, str]] = field(default_factory=list)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


@contextmanager
def watching(model: torch.nn.Module) -> Iterator[Evaluation]:
    """Hooks on every FakeQuantizer and every QuantWeightLayer of `model` while the block runs."""
    modules = dict(model.named_modules())
    quantizers = {site_name(path): m for path, m in modules.items() if isinstance(m, FakeQuantizer)}
    layers = {path: m for path, m in modules.items() if isinstance(m, QuantWeightLayer)}
    evaluation = Evaluation({name for name, q in quantizers.items() if not q.is_weight}, set(layers))

    def on_site(name: str):
        def hook(quantizer: FakeQuantizer, args: tuple, output: torch.Tensor) -> None:
            evaluation.calls.append((name, quantizer.mode, quantizer.quantize_prob, quantizer.observer is not None))
            evaluation.outputs.append((name, _digest(output)))
        return hook

    def on_layer(path: str):
        def hook(layer: QuantWeightLayer, args: tuple) -> None:
            site = layer.weight_quantizer
            evaluation.weight_calls.append((path, layer.frozen_weight is not None, site.mode, site.quantize_prob))
        return hook

    handles = [q.register_forward_hook(on_site(name)) for name, q in quantizers.items() if not q.is_weight]
    handles += [layer.register_forward_pre_hook(on_layer(path)) for path, layer in layers.items()]
    try:
        yield evaluation
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture
def evaluations(monkeypatch) -> dict[str, list[Evaluation]]:
    """Makes the harness evaluate every cell twice under `watching`; cell folder name -> both."""
    seen: dict[str, list[Evaluation]] = {}
    original = Harness._evaluate

    def evaluate_twice(self, task, model, cell_dir):
        runs = []
        for _ in range(2):
            with watching(model) as evaluation:
                metrics = original(self, task, model, cell_dir)
            runs.append(evaluation)
        seen[cell_dir.name.rsplit("-", 1)[0]] = runs  # the folder name without its cell-key suffix
        return metrics

    monkeypatch.setattr(Harness, "_evaluate", evaluate_twice)
    return seen


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo", ONE_IMAGE)


def run_cell(demo: Path, out: Path, method: str) -> int:
    return main(["run", "--data-root", str(demo), "--tasks", "coco", "--methods", method, "--bits", "4",
                 "--calib-size", "1", "--limit", "1", "--preset", "fast", "--device", DEVICE, "--out", str(out)])


def assert_every_site_quantizes(runs: list[Evaluation], fp_sites: set[str] = frozenset()) -> None:
    """Both evaluations: every activation site called, quantizing everything (except `fp_sites`,
    off), every weight layer called with its weight frozen on a quantizing site; and bit-identical."""
    first, second = runs
    for evaluation in runs:
        assert {name for name, *_ in evaluation.calls} == evaluation.activation_sites
        assert {path for path, *_ in evaluation.weight_calls} == evaluation.weight_layers
        wrong = [call for call in evaluation.calls if call[1:] != (("off", 1.0, False) if call[0] in fp_sites
                                                                     else ("quantize", 1.0, False))]
        assert not wrong, f"{len(wrong)} activation-site calls not quantizing everything, e.g. {wrong[:3]}"
        unsealed = [call for call in evaluation.weight_calls if call[1:] != (True, "quantize", 1.0)]
        assert not unsealed, f"{len(unsealed)} weight-layer calls without a sealed weight, e.g. {unsealed[:3]}"
    assert first.outputs == second.outputs


def assert_fp_row_runs_with_every_site_off(evaluations: dict[str, list[Evaluation]]) -> None:
    for evaluation in evaluations["sam_tiny-coco-fp-fp--"]:
        assert {name for name, *_ in evaluation.calls} == evaluation.activation_sites
        assert {mode for _, mode, *_ in evaluation.calls} == {"off"}


@pytest.mark.parametrize("method", BUILT_IN)
def test_every_site_quantizes_in_the_evaluation_of_every_method(method, demo, tmp_path, evaluations):
    assert run_cell(demo, tmp_path, method) == 0
    assert_every_site_quantizes(evaluations[f"sam_tiny-coco-{method}-W4A4-fast"])
    assert_fp_row_runs_with_every_site_off(evaluations)


class LeakyQDrop(MinMax):
    """MinMax ranges, then QDrop's test-time bypass left on every activation site (the leak)."""

    name = "leaky-qdrop"

    def calibrate(self, qmodel, fp_model, calib, spec, seed) -> None:
        super().calibrate(qmodel, fp_model, calib, spec, seed)
        for quantizer in quantizer_sites(qmodel).values():
            quantizer.quantize_prob = 0.5


class KeepsOneSiteOff(MinMax):
    """MinMax, then one decoder site switched back off, without declaring it."""

    name = "keeps-one-off"

    def calibrate(self, qmodel, fp_model, calib, spec, seed) -> None:
        super().calibrate(qmodel, fp_model, calib, spec, seed)
        quantizer_sites(qmodel)[KEPT_OFF].mode = "off"


class DeclaresOneSiteOff(KeepsOneSiteOff):
    """The same, with the site declared as an FP site."""

    name = "declares-one-off"
    fp_sites = ("mask_decoder.*.layers.0.self_attn.q",)


def test_the_seal_removes_a_random_bypass_left_at_test_time(demo, tmp_path, evaluations, monkeypatch):
    monkeypatch.setitem(METHODS._factories, LeakyQDrop.name, LeakyQDrop)
    assert run_cell(demo, tmp_path, LeakyQDrop.name) == 0
    assert_every_site_quantizes(evaluations["sam_tiny-coco-leaky-qdrop-W4A4-fast"])


def test_a_site_left_off_is_refused_in_one_line_and_the_fp_row_kept(demo, tmp_path, evaluations, monkeypatch,
                                                                     capsys):
    monkeypatch.setitem(METHODS._factories, KeepsOneSiteOff.name, KeepsOneSiteOff)
    assert run_cell(demo, tmp_path, KeepsOneSiteOff.name) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ptqbench: error:")]
    assert len(errors) == 1
    assert re.search(rf"1 of \d+ quantization sites are still off after calibration \({KEPT_OFF}\)", errors[0])
    assert list(evaluations) == ["sam_tiny-coco-fp-fp--"]
    stored = sqlite3.connect(tmp_path / "ptqbench.sqlite").execute("SELECT method FROM runs").fetchall()
    assert stored == [("fp",)]


def test_a_declared_fp_site_stays_off_and_every_other_site_quantizes(demo, tmp_path, evaluations, monkeypatch):
    monkeypatch.setitem(METHODS._factories, DeclaresOneSiteOff.name, DeclaresOneSiteOff)
    assert run_cell(demo, tmp_path, DeclaresOneSiteOff.name) == 0
    assert_every_site_quantizes(evaluations["sam_tiny-coco-declares-one-off-W4A4-fast"], fp_sites={KEPT_OFF})


def test_seal_error_names_the_first_sites_and_counts_them():
    qmodel = quantize_sam(build_sam_tiny(), 4, 4)
    names = list(quantizer_sites(qmodel))
    with pytest.raises(SealError) as raised:
        seal_for_evaluation(qmodel)
    message = str(raised.value)
    assert message.startswith(f"{len(names)} of {len(names)} quantization sites are still off after calibration "
                              f"({', '.join(names[:5])}, ...)")
    assert names[5] not in message
    seal_for_evaluation(qmodel, fp_sites=("image_encoder.*", "mask_decoder.*"))  # every site declared FP
    assert all(layer.frozen_weight is not None for layer in weight_layers(qmodel).values())
