"""Side by side with the reference: PTQ4SAM's own code and ptqbench, same SAM, data and device.

Issue 16, item 5. `--reference DIR` is a checkout of PTQ4SAM (github chengtao-lv/PTQ4SAM). It is
imported at run time from DIR (never copied): `DIR` and `DIR/ptq4sam/solver` go on sys.path, and
`test_quant`, `recon` and `utils` are imported as the reference's README runs them. (SAQ-SAM's
checkout has the same `test_quant.py`, but its `recon.py` is PAR's and imports wandb: not
supported here.) Both sides get the same random SAM weights (ptqbench's FP model, loaded into the
reference's own segment_anything copy built with `checkpoint=None`), the same `--images` random
normalised images [1, 3, S, S] with `--boxes` random boxes each (`recon_speed.random_calibration`),
and the same device. Timed:

(a) statistics calibration, W4A4. Reference: `quantize_model` with its `exp/config44.yaml` (the
    encoder quantized too, as `--quant-encoder`), the model moved to the device, then its
    `calibrate` (BIG on the first image, activation observers and AGQ searches over every image,
    weight ranges on the first). ptqbench: `quantize_sam` to the device, then `apply_big` and
    `Ptq4SamS(progress=False).statistics_steps` (paper preset), as `stats_speed.py` times them.
(b) one reconstruction step of an encoder window-attention unit, a global-attention unit and an
    MLP unit. Reference: its `recon_model` with `reconstruction` let through only for one unit of
    each kind, `iters` = warm-up + `--steps` + 1; the clock is read (device synchronised) in the
    loss of the first step after the warm-up and `--steps` steps later, so the capture of the
    unit's inputs, the optimiser set-up and the final hardening are not in the time. ptqbench:
    `recon_speed.bench_model` (QDrop settings, W4A4, CUDA graphs on a GPU), its steady-state
    ms/step, with the softmax sites on the AGQ log2 grid (learnable scale), as the reference's
    attention units have them; bench_model's units start from min/max ranges.
(c) the floor of (b)'s MLP step: its six float32 matrix products alone (two forward, an input and a
    weight gradient for each linear), on one image's tokens, as one CUDA graph. Its ratio to the
    reference's MLP step is the lowest ratio any float32 step of that unit can reach.

Before anything is timed, one FP encoder forward warms the device up for both sides, and the
ptqbench statistics run once on the first image on a throwaway twin (Triton kernels compile once
per machine; the reference has nothing to compile).

Stubbed (types.ModuleType entries in sys.modules, never called here; calling one raises):
mmcv, mmcv.utils/cnn/runner, mmdet, mmdet.apis/datasets/models/utils/core, except these, which
run: `mmcv.runner.get_dist_info` -> (0, 1) (one process, as a single-GPU run), `mmcv.Config` ->
the dict it gets, `mmdet.utils.build_dp` -> the module itself (the reference wraps each unit in
MMDataParallel on one GPU; without its scatter the reference's step is, if anything, faster),
`mmdet.models.DETECTORS.register_module` -> a no-op decorator, `mmdet.models.BaseDetector` ->
nn.Module. The reference's `projects.instance_segment_anything` package is registered without
running its `__init__` (which imports every detector wrapper), and its three detector wrappers
are empty modules: the boxes come with the data, as in its `extract_feat` / `only_forward_sam`
path on precomputed detections. Only where they do not import: easydict (a small attribute dict
stands in; the config is read by the reference's `utils.parse_config`), pandas, sympy, `py.log`,
cv2, torchvision (unused imports of the reference). With `--device cpu` (smoke tests only),
`torch.Tensor.cuda` and `nn.Module.cuda` become the identity, because the reference calls
`.cuda()` in its observers and its reconstruction loop; on a GPU nothing is patched.

    python benchmarks/reference_speed.py --reference ~/PTQ4SAM --device cuda       # SAM-B, 4 images
    OMP_NUM_THREADS=1 python benchmarks/reference_speed.py --reference /tmp/ptq4sam \
        --device cpu --model sam_tiny --images 1 --steps 2                           # smoke test
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.machinery
import logging
import subprocess
import sys
import time
import types
from pathlib import Path
from unittest import mock

import torch
from segment_anything.modeling import Sam
from tabulate import tabulate
from torch import nn

from ptqbench.methods.ptq4sam.method import Ptq4SamS, apply_big
from ptqbench.models.calibration import CalibrationSet
from ptqbench.models.sam1 import models as ptqbench_models
from ptqbench.models.sam1.calibration import sample_forward
from ptqbench.models.sam1.quantized import quantize_sam
from ptqbench.recon.engine import ReconstructionSettings

from recon_speed import WARMUP_STEPS, bench_model, build, random_calibration  # the script folder is on sys.path
from stats_speed import timed

PACKAGE = "projects.instance_segment_anything"
DETECTOR_WRAPPERS = {"focalnet_dino.focalnet_dino_wrapper": "FocalNetDINOWrapper",
                     "hdetr.hdetr_wrapper": "HDetrWrapper",
                     "detector.detector_wrapper": "DetectorWrapper"}
UNIT_KINDS = ("encoder attn (window)", "encoder attn (global)", "encoder mlp")
TARGET_STATISTICS, TARGET_STEP = 0.2, 0.5  # ptqbench / reference, at most (issue 16)
PRESET = "paper"
MLP_FLOOR = "encoder mlp, its six float32 matrix products alone"


class Unused:
    """A name the reference imports but never uses here; calling it says which stub was reached."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: object, **kwargs: object) -> object:
        raise RuntimeError(f"reference_speed.py stubs {self.name}; the reference reached it")


class AttrDict(dict):
    """Stands in for easydict.EasyDict when it is not installed: nested dicts read as attributes."""

    def __init__(self, data: dict | None = None) -> None:
        super().__init__()
        for key, value in (data or {}).items():
            self[key] = value

    def __setitem__(self, key: str, value: object) -> None:
        super().__setitem__(key, AttrDict(value) if type(value) is dict else value)

    def __getattr__(self, key: str) -> object:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: object) -> None:
        self[key] = value

    def __deepcopy__(self, memo: dict) -> AttrDict:
        return AttrDict(copy.deepcopy(dict(self), memo))


class NoDetector(nn.Module):
    """Stands in for the reference's detector wrappers: the boxes come with the calibration data."""

    def __init__(self, args: object = None) -> None:
        super().__init__()


class BaseDetector(nn.Module):
    """mmdet's BaseDetector as far as `DetWrapperInstanceSAM` uses it: an nn.Module."""

    def __init__(self, init_cfg: object = None) -> None:
        super().__init__()


def stub(name: str, **attrs: object) -> types.ModuleType:
    """Register a module `name` holding `attrs`; any other public name is an `Unused` placeholder."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)

    def missing(attr: str) -> object:
        """Module __getattr__: a placeholder for any public name not given."""
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Unused(f"{name}.{attr}")

    module.__getattr__ = missing  # PEP 562
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, module)
    return module


def stub_if_missing(name: str, *attrs: str, **values: object) -> None:
    """Stub `name` (with `values`) unless it imports and has `attrs`."""
    try:
        module = importlib.import_module(name)
        if all(hasattr(module, attr) for attr in attrs):
            return
    except ImportError:
        pass
    stub(name, **values)


def install_stubs(root: Path) -> None:
    """What the reference imports from mmcv / mmdet and its detector code, without running any of it."""
    registry = types.SimpleNamespace(register_module=lambda *args, **kwargs: (lambda cls: cls))
    stub("mmcv", Config=lambda cfg=None, **kwargs: cfg)
    for name in ("mmcv.utils", "mmcv.cnn", "mmdet", "mmdet.apis", "mmdet.datasets", "mmdet.core"):
        stub(name)
    stub("mmcv.runner", get_dist_info=lambda: (0, 1))
    stub("mmdet.models", DETECTORS=registry, BaseDetector=BaseDetector)
    stub("mmdet.utils", build_dp=lambda module, *args, **kwargs: module)
    stub_if_missing("easydict", "EasyDict", EasyDict=AttrDict)
    stub_if_missing("py", "log")
    stub_if_missing("sympy", "im")
    stub_if_missing("pandas")
    stub_if_missing("cv2")
    try:
        importlib.import_module("torchvision.ops.boxes")
        importlib.import_module("torchvision.transforms.functional")
    except ImportError:
        for name in ("torchvision", "torchvision.ops", "torchvision.ops.boxes", "torchvision.transforms",
                     "torchvision.transforms.functional"):
            stub(name)
    package = types.ModuleType(PACKAGE)  # its __init__ imports every detector wrapper: not run
    package.__path__ = [str(root / "projects" / "instance_segment_anything")]
    package.__spec__ = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
    sys.modules[PACKAGE] = package
    for module, cls in DETECTOR_WRAPPERS.items():
        stub(f"{PACKAGE}.models.{module}", **{cls: NoDetector})


def import_reference(root: Path) -> types.SimpleNamespace:
    """Import the reference's solver, recon, config reader, detector wrapper and segment_anything."""
    solver = root / "ptq4sam" / "solver"
    if not (solver / "test_quant.py").is_file():
        sys.exit(f"{root} is not a PTQ4SAM checkout: {solver / 'test_quant.py'} is missing")
    install_stubs(root)
    sys.path[:0] = [str(root), str(solver)]
    test_quant = importlib.import_module("test_quant")
    test_quant.logger = logging.getLogger("ptq4sam")  # set by its main(); calibrate() logs to it
    return types.SimpleNamespace(
        test_quant=test_quant,
        recon=importlib.import_module("recon"),
        utils=importlib.import_module("utils"),
        wrapper=importlib.import_module(f"{PACKAGE}.models.det_wrapper_instance_sam"),
        segment_anything=importlib.import_module(f"{PACKAGE}.models.segment_anything"),
        modeling=importlib.import_module(f"{PACKAGE}.models.segment_anything.modeling"))


def build_reference_model(ref: types.SimpleNamespace, fp_model: Sam, model_name: str) -> nn.Module:
    """The reference's DetWrapperInstanceSAM (its own SAM, checkpoint=None) with `fp_model`'s weights.

    sam_vit_b/l/h come from the reference's `sam_model_registry`; sam_tiny is ptqbench's tiny
    builder run with the reference's modeling classes (registered in that registry at run time).
    """
    kind = model_name.removeprefix("sam_")
    registry = ref.segment_anything.sam_model_registry
    if kind not in registry:
        modeling = ref.modeling
        classes = {name: getattr(modeling, name)
                   for name in ("Sam", "ImageEncoderViT", "PromptEncoder", "MaskDecoder", "TwoWayTransformer")}

        def build_like_ptqbench(checkpoint: None = None) -> nn.Module:
            with mock.patch.multiple(ptqbench_models, **classes):
                return getattr(ptqbench_models, f"build_{model_name}")()

        registry[kind] = build_like_ptqbench
    model = ref.wrapper.DetWrapperInstanceSAM(det_wrapper_type="generalized_detector", det_wrapper_cfg={},
                                              model_type=kind, sam_checkpoint=None)
    model.predictor.model.load_state_dict(fp_model.state_dict())
    return model


def reference_calibration(calib: CalibrationSet) -> list:
    """The calibration set as the reference's `extract_feat` takes precomputed detections:
    [[{'boxes': boxes}], (image, original size)]. The image is de-normalised, so the reference's
    `preprocess` gives back ptqbench's input; the original size is the input size, so its
    `apply_boxes_torch` keeps the boxes as they are."""
    data = []
    for sample in calib.samples:
        image = sample.image
        mean = torch.tensor(ptqbench_models.SAM_PIXEL_MEAN, device=image.device).view(-1, 1, 1)
        std = torch.tensor(ptqbench_models.SAM_PIXEL_STD, device=image.device).view(-1, 1, 1)
        data.append([[{"boxes": sample.boxes}], (image * std + mean, tuple(image.shape[-2:]))])
    return data


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clocked_loss(base: type, device: torch.device, first: int, steps: int, marks: list[float]) -> type:
    """The reference's LossFunction, reading the clock in the loss of step `first` and `first + steps`."""

    class ClockedLoss(base):
        """The reference's loss, unchanged, with the clock read before two of its calls."""

        def __call__(self, pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
            if self.count + 1 in (first, first + steps):
                synchronize(device)
                marks.append(time.perf_counter())
            return super().__call__(pred, tgt)

    return ClockedLoss


def reference_units(model: nn.Module) -> dict[nn.Module, str]:
    """The first encoder unit of each timed kind (its recon units: each block's attention and MLP)."""
    units: dict[nn.Module, str] = {}
    for block in model.predictor.model.image_encoder.blocks:
        for unit, kind in ((block.attn, f"encoder attn ({'window' if block.window_size else 'global'})"),
                           (block.mlp, "encoder mlp")):
            if kind not in units.values():
                units[unit] = kind
    return units


def reference_steps(ref: types.SimpleNamespace, model: nn.Module, fp_model: nn.Module, cali_data: list,
                    recon_config: dict, steps: int, device: torch.device) -> dict[str, float]:
    """Seconds per step of the reference's reconstruction, one unit of each kind, via its recon_model."""
    units = reference_units(model)
    config = copy.deepcopy(recon_config)
    config.iters = WARMUP_STEPS + steps + 1
    reconstruction = ref.test_quant.reconstruction
    step_s: dict[str, float] = {}

    def selected(model_: nn.Module, fp_model_: nn.Module, module: nn.Module, fp_module: nn.Module,
                 data: list, config_: dict) -> None:
        """The reference's `reconstruction` for the selected units, timed; the others are skipped."""
        if module not in units:
            return
        marks: list[float] = []
        loss = clocked_loss(ref.recon.LossFunction, device, WARMUP_STEPS + 1, steps, marks)
        with mock.patch.object(ref.recon, "LossFunction", loss):
            reconstruction(model_, fp_model_, module, fp_module, data, config_)
        step_s[units[module]] = (marks[1] - marks[0]) / steps
        print(f"reference {units[module]}: {1000 * step_s[units[module]]:.2f} ms/step", flush=True)

    torch.manual_seed(0)
    with mock.patch.object(ref.test_quant, "reconstruction", selected):
        ref.test_quant.recon_model(model, fp_model, cali_data, config)
    return step_s


def run_reference(root: Path, config_path: Path, fp_model: Sam, model_name: str, calib: CalibrationSet,
                  steps: int, device: torch.device) -> dict[str, float]:
    """The reference's statistics calibration (quantize, calibrate) and reconstruction step times."""
    ref = import_reference(root)
    q_config = ref.utils.parse_config(str(config_path))
    model = build_reference_model(ref, fp_model, model_name)
    cali_data = reference_calibration(calib)
    for parameter in model.parameters():  # as its main(), before quantize_model
        parameter.requires_grad = False
    args = argparse.Namespace(quant_encoder=True)

    def quantize() -> None:
        ref.test_quant.quantize_model(model, q_config, args).to(device).eval()

    times = {"quantize": timed(device, quantize)}
    print(f"reference quantize_model: {times['quantize']:.1f} s", flush=True)
    fp_twin = copy.deepcopy(model)  # its FP model for reconstruction, copied before calibrate
    times["calibrate"] = timed(device, lambda: ref.test_quant.calibrate(model, cali_data, q_config.ptq4sam.BIG))
    print(f"reference calibrate: {times['calibrate']:.1f} s", flush=True)
    times.update(reference_steps(ref, model, fp_twin, cali_data, q_config.recon, steps, device))
    return times


def ptqbench_statistics(fp_model: Sam, calib: CalibrationSet, device: torch.device) -> dict[str, float]:
    """ptqbench's `ptq4sam-s` statistics: quantize_sam, then BIG and the statistics steps, timed."""
    twin: list[Sam] = []
    times = {"quantize": timed(device, lambda: twin.append(quantize_sam(fp_model, 4, 4).to(device)))}
    qmodel = twin[0]
    times["calibrate"] = timed(device, lambda: apply_big(qmodel, fp_model, calib))
    for _, step in Ptq4SamS(Ptq4SamS.presets[PRESET], progress=False).statistics_steps(qmodel, calib):
        times["calibrate"] += timed(device, step)
    return times


def run_ptqbench(fp_model: Sam, model_name: str, calib: CalibrationSet, boxes: int, steps: int,
                 device: torch.device) -> dict[str, float]:
    """ptqbench's statistics calibration and per-unit step times (recon_speed.bench_model)."""
    times = ptqbench_statistics(fp_model, calib, device)
    print(f"ptqbench quantize_sam: {times['quantize']:.1f} s, BIG + statistics: {times['calibrate']:.1f} s",
          flush=True)
    rows, _ = bench_model(model_name, steps, len(calib.samples), boxes, device,
                          ReconstructionSettings(forward=sample_forward), softmax="log2")
    times.update({row[1]: float(row[3]) / 1000 for row in rows if row[1] in UNIT_KINDS})
    times[MLP_FLOOR] = mlp_matmul_floor(fp_model, device, steps)
    return times


def mlp_matmul_floor(fp_model: Sam, device: torch.device, steps: int) -> float:
    """Seconds per step of the encoder MLP step's six float32 matrix products alone: the forward of
    its two linears and, for each, the input and the weight gradient, on one image's tokens
    x [T, C] (SAM-B: T = 64 * 64, C = 768; random values, the first block's weights). No step of
    that unit, quantized or not, can take less; on a GPU they run as one CUDA graph, as ptqbench's
    step does."""
    encoder = fp_model.image_encoder
    tokens = (encoder.img_size // encoder.patch_embed.proj.kernel_size[0]) ** 2
    mlp = encoder.blocks[0].mlp
    w1, w2 = mlp.lin1.weight.detach(), mlp.lin2.weight.detach()  # [4C, C], [C, 4C]
    x = torch.randn(tokens, w1.shape[1], device=device)
    hidden = torch.randn(tokens, w1.shape[0], device=device)
    grad_hidden, grad_out = torch.randn_like(hidden), torch.randn_like(x)

    def products() -> None:
        """Forward: x W1^T, h W2^T; backward: g2 W2, g2^T h, g1 W1, g1^T x."""
        for left, right in ((x, w1.t()), (hidden, w2.t()), (grad_out, w2), (grad_out.t(), hidden),
                            (grad_hidden, w1), (grad_hidden.t(), x)):
            torch.mm(left, right)

    run = products
    if device.type == "cuda":
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            products()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            products()
        run = graph.replay
    for _ in range(WARMUP_STEPS):
        run()
    return timed(device, lambda: [run() for _ in range(steps)]) / steps


def warm_up(fp_model: Sam, calib: CalibrationSet, device: torch.device) -> None:
    """One FP encoder forward (device start-up, both sides) and ptqbench's statistics on one image."""
    with torch.no_grad():
        fp_model.image_encoder(calib.samples[0].image)
    ptqbench_statistics(fp_model, CalibrationSet(samples=calib.samples[:1], fingerprint="warm-up"), device)
    synchronize(device)


def table(reference: dict[str, float], ptqbench: dict[str, float]) -> list[list[str]]:
    """Rows: what, reference, ptqbench, ratio, target (within / OVER)."""
    def row(what: str, ref_value: float, ours: float, unit: str, target: float | None,
            note: str = "") -> list[str]:
        """One row; times in seconds, shown as s or ms/step."""
        ratio = ours / ref_value if ref_value > 0 else float("nan")
        scale = 1000 if unit == "ms/step" else 1
        verdict = note if target is None else f"<= {target:g}: {'within' if ratio <= target else 'OVER'}"
        return [f"{what} ({unit})", f"{scale * ref_value:.2f}", f"{scale * ours:.2f}", f"{ratio:.3f}", verdict]

    rows = [row("quantize the model", reference["quantize"], ptqbench["quantize"], "s", None),
            row("calibrate (BIG, activations + AGQ, weights)", reference["calibrate"], ptqbench["calibrate"], "s",
                None),
            row("statistics calibration, total", reference["quantize"] + reference["calibrate"],
                ptqbench["quantize"] + ptqbench["calibrate"], "s", TARGET_STATISTICS)]
    rows += [row(f"reconstruction step, {kind}", reference[kind], ptqbench[kind], "ms/step", TARGET_STEP)
             for kind in UNIT_KINDS]
    rows.append(row(MLP_FLOOR, reference["encoder mlp"], ptqbench[MLP_FLOOR], "ms/step", None,
                    "the lowest MLP ratio in float32"))
    return rows


def reference_commit(root: Path) -> str:
    """The checkout's commit, for the record (or why there is none). Only a checkout whose own top
    folder is `root` counts: an extracted archive inside another repository is not one."""
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=30)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root.resolve():
            return "not a git checkout"
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "commit unknown"
    return f"commit {result.stdout.strip()}" if result.returncode == 0 else "commit unknown"


def main() -> None:
    """Parse the flags, run both sides on the same model and data, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True,
                        help="checkout of PTQ4SAM (github chengtao-lv/PTQ4SAM)")
    parser.add_argument("--config", default="exp/config44.yaml", help="the reference's W4A4 config, relative to DIR")
    parser.add_argument("--model", default="sam_vit_b", help="sam_vit_b (sam_vit_l, sam_vit_h, sam_tiny)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=4, help="random calibration images")
    parser.add_argument("--boxes", type=int, default=16, help="random box prompts per image")
    parser.add_argument("--steps", type=int, default=20, help="timed reconstruction steps per unit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cpu":  # the reference's .cuda() calls: the identity in a CPU smoke test
        torch.Tensor.cuda = lambda self, *a, **k: self
        nn.Module.cuda = lambda self, *a, **k: self
    fp_model = build(args.model).to(device)
    calib = random_calibration(fp_model.image_encoder.img_size, args.images, args.boxes, device)
    warm_up(fp_model, calib, device)
    reference = run_reference(args.reference.resolve(), args.reference.resolve() / args.config, fp_model,
                              args.model, calib, args.steps, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ptqbench = run_ptqbench(fp_model, args.model, calib, args.boxes, args.steps, device)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)")
    print(f"\n{args.model}, W4A4 ({args.config}), {args.images} images x {args.boxes} boxes, "
          f"{args.steps} timed steps per unit after {WARMUP_STEPS}, {device_name}, "
          f"reference {args.reference} ({reference_commit(args.reference)})")
    print(tabulate(table(reference, ptqbench), tablefmt="github", disable_numparse=True,
                   headers=["what", "reference", "ptqbench", "ratio ptqbench/reference", "target"]))


if __name__ == "__main__":
    main()
