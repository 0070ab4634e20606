"""Run configuration: a frozen dataclass loaded from YAML and overridden by command-line flags."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ptqbench.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 16
PRESETS = ("paper", "fast")
PROTOCOLS = ("gt", "paper")
DEFAULT_CALIB_SIZE = 32


@dataclass(frozen=True, order=True)
class BitSpec:
    """Weight and activation bit widths of one grid cell (e.g. W4A4)."""

    w_bits: int
    a_bits: int

    @property
    def label(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    @classmethod
    def parse(cls, text: str) -> BitSpec:
        """`4` -> W4A4; `w4a8` / `W4A8` -> W4A8. Bit widths must lie in 2..16."""
        token = text.strip().lower()
        match = re.fullmatch(r"(\d+)", token) or re.fullmatch(r"w(\d+)a(\d+)", token)
        if not match:
            raise ConfigError(f"cannot read bit width {text!r}: use a number like 4 or a pair like w4a8")
        values = [int(g) for g in match.groups()]
        w_bits, a_bits = (values[0], values[0]) if len(values) == 1 else values
        for bits in (w_bits, a_bits):
            if not MIN_BITS <= bits <= MAX_BITS:
                raise ConfigError(f"bit width {bits} in {text!r} is outside {MIN_BITS}..{MAX_BITS}")
        return cls(w_bits, a_bits)


def parse_bits(text: str) -> tuple[BitSpec, ...]:
    """A comma-separated list: `4,6` -> (W4A4, W6A6); duplicates removed, order kept."""
    specs = [BitSpec.parse(part) for part in text.split(",") if part.strip()]
    if not specs:
        raise ConfigError("--bits is empty: give bit widths like 4,6 or w4a8")
    return tuple(dict.fromkeys(specs))


def split_names(text: str, option: str = "name list") -> tuple[str, ...]:
    """A comma-separated list of names, lower-cased, duplicates removed; `option` names the
    option in the error for an empty list."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    if not names:
        raise ConfigError(f"{option} is empty: give at least one name")
    return names


def parse_seeds(text: str, option: str = "--seeds") -> tuple[int, ...]:
    """"0,1,2" -> (0, 1, 2): distinct non-negative integers; ConfigError naming `option` otherwise."""
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated non-negative integers, got {text!r}") from None
    if not seeds or any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{option} must be distinct non-negative integers, got {text!r}")
    return seeds


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run of the grid.

    data_root None means: the demo data (generated offline on first use) when no model was named
    either, else $PTQBENCH_DATASETS, else ./datasets. preset None means: `fast` for sam_tiny,
    `paper` for full-size SAM. calib_size None means: DEFAULT_CALIB_SIZE calibration samples, or
    all the calibration split has when it has fewer (the demo's splits are small on purpose);
    an explicit size larger than the split is calibrated on all of it with a warning.
    method_options: (method, option, value) triples set on the preset's configuration of that
    method (`ptqbench.methods.options`; option names may be dotted, e.g. ("saqsam",
    "pcc.max_prompts", "8")).
    seeds: the calibration draws; every quantized cell runs once per seed (`--seeds 0,1,2`,
    `--seed N` for one), the FP cell once (with the first). A seed fixes every random choice of a
    cell: which calibration images (`tasks.base.calibration_order`), which prompts a method
    samples, and the method's own draws.
    bootstrap: resamples of the evaluation images behind each cell's 95% intervals
    (`tasks.bootstrap`; 0 = no intervals).
    protocol: "gt" (the prompts the flags name, else ground-truth boxes) or "paper" (detector
    prompts, generated when missing; `ptqbench.prompts.protocol`). detector, detector_weights,
    detector_options: the paper protocol's COCO detector (None: fasterrcnn_resnet50_fpn with
    torchvision's weights), its weights ("random" or a state dict file) and its settings as
    (name, value) pairs (`ptqbench.prompts.zoo.DetectorSettings`); only for protocol "paper".
    """

    model: str = "sam_tiny"
    checkpoint: str | None = None
    tasks: tuple[str, ...] = ("coco",)
    methods: tuple[str, ...] = ("minmax",)
    bits: tuple[BitSpec, ...] = (BitSpec(4, 4),)
    data_root: str | None = None
    prompts: str | None = None
    calib_prompts: str | None = None
    calib_split: str | None = None
    calib_size: int | None = None
    limit: int | None = None
    device: str = "auto"
    seeds: tuple[int, ...] = (0,)
    bootstrap: int = 1000
    preset: str | None = None
    out: str = "results"
    resume: bool = True
    task_options: tuple[tuple[str, str], ...] = field(default=())
    method_options: tuple[tuple[str, str, object], ...] = field(default=())
    protocol: str = "gt"
    detector: str | None = None
    detector_weights: str | None = None
    detector_options: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        self._check_types()
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.protocol != "paper":
            for name in ("detector", "detector_weights", "detector_options"):
                if getattr(self, name):
                    raise ConfigError(f"{name.replace('_', '-')} is set but only --protocol paper runs a detector "
                                      f"(this run's protocol is {self.protocol})")
        if (not self.seeds or not all(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0
                                      for seed in self.seeds) or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"seeds must be distinct non-negative integers, got {self.seeds!r}")
        if self.calib_size is not None and self.calib_size < 1:
            raise ConfigError(f"--calib-size must be at least 1, got {self.calib_size}")
        if self.bootstrap < 0:
            raise ConfigError(f"--bootstrap must be 0 (off) or a number of resamples, got {self.bootstrap}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")

    def _check_types(self) -> None:
        """ConfigError naming the first field whose value has the wrong type."""
        for name, expected in _FIELD_TYPES.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if isinstance(value, expected) and (expected is bool or not isinstance(value, bool)):
                continue
            what = {str: "a string", int: "an integer", bool: "true or false"}[expected]
            raise ConfigError(f"{name} must be {what}, got {value!r}")
        for name in ("tasks", "methods"):
            if not all(isinstance(item, str) for item in getattr(self, name)):
                raise ConfigError(f"{name} must be a name or a list of names, got {getattr(self, name)!r}")

    def with_overrides(self, **overrides: Any) -> RunConfig:
        """A copy with the given (non-None) fields replaced."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


_FIELD_TYPES = {
    "model": str, "checkpoint": str, "data_root": str, "prompts": str, "calib_prompts": str,
    "calib_split": str, "calib_size": int, "limit": int, "device": str, "preset": str, "bootstrap": int,
    "out": str, "resume": bool, "protocol": str, "detector": str, "detector_weights": str,
}
_OPTIONAL = {"checkpoint", "data_root", "prompts", "calib_prompts", "calib_split", "calib_size", "limit",
             "preset", "detector", "detector_weights"}


def _config_value(name: str, value: Any) -> Any:
    """A YAML value of option `name` in RunConfig form: name lists and bit widths parsed (a
    single value or a list; a bare number is a bit width like `--bits 8`), task options from a
    mapping. Other values pass unchanged; RunConfig checks their types."""
    if name in ("tasks", "methods", "bits"):
        items = value if isinstance(value, list) else [value]
        allowed = (str, int) if name == "bits" else (str,)
        if not all(isinstance(item, allowed) and not isinstance(item, bool) for item in items):
            what = "a bit width or a list of them" if name == "bits" else "a name or a list of names"
            raise ConfigError(f"{name} must be {what}, got {value!r}")
        text = ",".join(map(str, items))
        return parse_bits(text) if name == "bits" else split_names(text, name)
    if name == "method_options":
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise ConfigError("method_options must map method names to mappings of option names to values, "
                              f"e.g. {{saqsam: {{pcc: {{max_prompts: 8}}}}}}, got {value!r}")
        return tuple((str(method).lower(), name, option)
                     for method, options in value.items() for name, option in _flatten(options))
    if name == "seeds":
        return parse_seeds(",".join(map(str, value if isinstance(value, list) else [value])), "seeds")
    if name in ("task_options", "detector_options"):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of option names to values, got {value!r}")
        return tuple((str(k), str(v)) for k, v in value.items())
    return value


def _flatten(options: dict, prefix: str = "") -> list[tuple[str, object]]:
    """A nested mapping of options as (dotted name, value) pairs: {par: {max_prompts: 4}} ->
    [("par.max_prompts", 4)]."""
    pairs: list[tuple[str, object]] = []
    for key, value in options.items():
        name = f"{prefix}{key}"
        pairs += _flatten(value, f"{name}.") if isinstance(value, dict) else [(name, value)]
    return pairs


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML run configuration into RunConfig field values (lists and bit specs parsed);
    ConfigError naming the file and the key for an unknown key or a value of the wrong type
    or range."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    known = {f.name for f in fields(RunConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = "seeds" if key == "seed" else key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {path}: unknown option {key!r}")
        try:
            values[name] = _config_value(name, value)
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    try:
        RunConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    return values
