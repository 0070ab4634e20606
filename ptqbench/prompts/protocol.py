"""The prompts of each task of a run under `--protocol gt|paper`, and what its rows record.

- `gt` (the default): the prompts the flags name (`--prompts`, `--calib-prompts`), else the
  ground-truth boxes (ADE20K: its GT components, or `mode=ssa` with the given priors), as before
  protocols existed. Rows record protocol `gt`, detector `-`.
- `paper`: the published protocol. COCO: the boxes of an FP detector (`--detector`, default
  `fasterrcnn_resnet50_fpn`, with `--detector-weights` and `--detector-option`s) on the
  evaluated images (the first `--limit` by id, else the whole split) and on the first
  `--calib-size` calibration images in annotation order, generated when missing and cached
  (`prompts.coco`); a `--prompts` / `--calib-prompts` file given replaces that side's generation.
  DOTA: no rotated detector ships here, so `--prompts` must name a Task1 folder (MMRotate's
  horizontal boxes, see datasets/README.md). ADE20K: SSA, so `mode=ssa` with a `semantic_prior`
  folder (`ptqbench prompts ade20k` makes one). Rows record protocol `paper` and the detector:
  `<name>@<weights sha256>` when prompts were generated, `user` when every source was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptqbench.config import DEFAULT_CALIB_SIZE, RunConfig
from ptqbench.errors import ConfigError
from ptqbench.prompts.zoo import DEFAULT_DETECTOR, parse_detector_options

GT, PAPER = "gt", "paper"
NO_DETECTOR = "-"
USER_PROMPTS = "user"


@dataclass(frozen=True)
class TaskPrompts:
    """One task's prompt sources for a run, and the row fields they give.

    prompts / calib_prompts: the TaskConfig's (a file or folder path, None for GT); options: the
    task's options; label: the rows' `prompts` column; protocol and detector: theirs.
    """

    prompts: str | None
    calib_prompts: str | None
    options: tuple[tuple[str, str], ...]
    label: str
    protocol: str = GT
    detector: str = NO_DETECTOR


def plan_task_prompts(task: str, config: RunConfig, data_root: Path, options: tuple[tuple[str, str], ...], *,
                      quantizes: bool, device: str, progress: bool) -> TaskPrompts:
    """The prompt sources of `task` under `config.protocol`; generates (or reuses from the cache)
    the COCO detector prompts the paper protocol lacks. ConfigError for a task whose paper
    protocol needs a source this run does not give."""
    given = TaskPrompts(config.prompts, config.calib_prompts, options, config.prompts or GT)
    if config.protocol == GT:
        return given
    if task == "coco":
        return _coco_paper(config, data_root, options, quantizes=quantizes, device=device, progress=progress)
    if task == "dota" and config.prompts is None:
        raise ConfigError("--protocol paper has no detector for dota here (torchvision ships no rotated detector): "
                          "make Task1 folders with MMRotate (datasets/README.md) and give --prompts DIR "
                          "(and --calib-prompts DIR)")
    if task == "ade20k":
        values = dict(options)
        if values.get("mode", "gt").lower() != "ssa" or "semantic_prior" not in values:
            raise ConfigError("--protocol paper on ade20k is SSA: add --task-option mode=ssa --task-option "
                              "semantic_prior=DIR, with DIR from `ptqbench prompts ade20k --segformer b5 --out DIR`")
    return TaskPrompts(given.prompts, given.calib_prompts, options, given.label, PAPER, USER_PROMPTS)


def _coco_paper(config: RunConfig, data_root: Path, options: tuple[tuple[str, str], ...], *, quantizes: bool,
                device: str, progress: bool) -> TaskPrompts:
    """COCO under the paper protocol: generated (or given) evaluation and calibration prompts."""
    from ptqbench.prompts.coco import generate_coco_prompts
    from ptqbench.tasks.coco import CALIB_SPLIT, EVAL_SPLIT

    detector = config.detector or DEFAULT_DETECTOR
    settings = parse_detector_options(config.detector_options)

    def generate(split: str, **selection: int | None) -> str:
        made = generate_coco_prompts(data_root, split, detector, weights=config.detector_weights, settings=settings,
                                     device=device, progress=progress, **selection)
        labels.append(made.label)
        return str(made.path)

    labels: list[str] = []
    prompts = config.prompts or generate(EVAL_SPLIT, limit=config.limit)
    label = config.prompts or Path(prompts).name
    calib_prompts = config.calib_prompts
    if calib_prompts is None and quantizes:
        calib_prompts = generate(config.calib_split or CALIB_SPLIT, first=config.calib_size or DEFAULT_CALIB_SIZE)
    return TaskPrompts(prompts, calib_prompts, options, label, PAPER, labels[0] if labels else USER_PROMPTS)
