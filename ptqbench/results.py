"""The run store (one SQLite file per output folder) and the leaderboards exported from it.

`<out>/ptqbench.sqlite` is the source of truth: one row per cell (model, checkpoint, task,
dataset, prompts, evaluated images, method, bits, preset, method configuration, seed, calibration
set, labels, prompt protocol and detector), keyed by `cell_key`, so a finished cell is found
again on re-run (resume). Each `put` is one transaction; the file is in WAL mode so readers and a
writer can share it. Every operation opens its own short-lived connection: several `RunStore`
objects (or processes) on one file are fine.

`write_leaderboards` regenerates `<out>/leaderboard_<task>.csv` and `.md` from the store.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from ptqbench.errors import DataError
from ptqbench.files import write_text_atomic
from ptqbench.methods.options import NO_OPTIONS_JSON, config_id
from ptqbench.seed_statistics import INTERVAL_COLUMNS, mean_over_seeds

STORE_FILENAME = "ptqbench.sqlite"
RUNS_DIR = "runs"  # <out>/runs/<cell_folder>: each cell's artefacts
REPORT_MAPS_FILE = "report_maps.npz"  # in a cell's folder: its method's `report_maps`, for the report
FP = "fp"
SCHEMA_VERSION = 5
_KEY_FIELDS = ("model", "checkpoint_sha256", "task", "dataset_fingerprint", "prompts", "images", "method",
               "bits", "preset", "method_config", "seed", "calib_fingerprint", "labels", "protocol", "detector")
# The protocol and detector of every row stored before protocols existed (schema 1 to 3): GT
# boxes or the user's prompt files, no generated prompts.
GT_PROTOCOL, NO_DETECTOR = "gt", "-"
# The method configuration of rows stored before configurations were recorded (schema 1 and 2).
UNRECORDED_CONFIG = ""
# The fields of a record that fix its evaluation (the FP row a quantized row is compared with
# shares them all); the task is implied, as a leaderboard is of one task.
_EVALUATION_FIELDS = ("model", "checkpoint_sha256", "dataset_fingerprint", "protocol", "detector", "prompts",
                      "images")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    checkpoint_sha256 TEXT NOT NULL,
    task TEXT NOT NULL,
    dataset_fingerprint TEXT NOT NULL,
    prompts TEXT NOT NULL,
    method TEXT NOT NULL,
    bits TEXT NOT NULL,
    w_bits INTEGER,
    a_bits INTEGER,
    preset TEXT NOT NULL,
    method_config TEXT NOT NULL,
    seed INTEGER NOT NULL,
    calib_fingerprint TEXT,
    metrics TEXT NOT NULL,
    metric TEXT NOT NULL,
    calib_s REAL NOT NULL,
    eval_s REAL NOT NULL,
    images INTEGER NOT NULL,
    peak_mem_mb REAL,
    device TEXT NOT NULL,
    versions TEXT NOT NULL,
    git_commit TEXT,
    labels TEXT NOT NULL,
    created_at TEXT NOT NULL,
    protocol TEXT NOT NULL DEFAULT 'gt',
    detector TEXT NOT NULL DEFAULT '-',
    intervals TEXT NOT NULL DEFAULT '{}',
    delta_interval TEXT NOT NULL DEFAULT 'null'
)
"""
_JSON_FIELDS = ("metrics", "versions", "labels", "intervals", "delta_interval")


def now_iso() -> str:
    """The current UTC time as an ISO 8601 string with seconds, e.g. 2024-05-01T12:00:00+00:00."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunRecord:
    """One evaluated cell.

    bits: "fp" for the full-precision row, else e.g. "W4A4" (w_bits/a_bits hold the numbers,
    None for fp). metrics: every value the task returned (percentages); metric: the headline
    key. images: how many evaluation images were scored, the first `images` of the split in
    evaluation order (what `--limit` decides), so with dataset_fingerprint (which covers the
    split) it names the evaluation set. calib_fingerprint: hash of the calibration set (None
    for fp). method_config: the method's effective configuration as canonical JSON
    (`ptqbench.methods.options.config_json`; "{}" for fp, "" for rows stored before
    configurations were recorded). labels: caveats shown in the leaderboard, e.g. ("untrained",).
    peak_mem_mb: None where it was not measured. protocol: "gt" or "paper" (`--protocol`);
    detector: what made the prompts under the paper protocol ("<detector>@<weights sha256>" for
    generated prompts, "user" for the user's files), "-" under gt. intervals: {metric: [low, high]},
    the 95% bootstrap intervals over evaluation images (`ptqbench.tasks.bootstrap`; {} when the
    bootstrap was off or for rows stored before it existed); delta_interval: [low, high] of the
    paired difference of the headline metric to the FP row of the same evaluation, None without one.
    """

    model: str
    checkpoint_sha256: str
    task: str
    dataset_fingerprint: str
    prompts: str
    method: str
    bits: str
    w_bits: int | None
    a_bits: int | None
    preset: str
    method_config: str
    seed: int
    calib_fingerprint: str | None
    metrics: dict[str, float]
    metric: str
    calib_s: float
    eval_s: float
    images: int
    peak_mem_mb: float | None
    device: str
    versions: dict[str, str]
    git_commit: str | None
    labels: tuple[str, ...] = ()
    created_at: str = field(default_factory=now_iso)
    protocol: str = GT_PROTOCOL
    detector: str = NO_DETECTOR
    intervals: dict[str, list[float]] = field(default_factory=dict)
    delta_interval: list[float] | None = None

    def __post_init__(self) -> None:
        if self.metric not in self.metrics:
            raise ValueError(f"headline metric {self.metric!r} is not among the metrics {sorted(self.metrics)}")
        if not isinstance(self.labels, tuple):
            raise TypeError(f"labels must be a tuple of strings, got {type(self.labels).__name__}")

    @property
    def key(self) -> str:
        """The cell key of this record (see `RunStore.cell_key`)."""
        return RunStore.cell_key(**{name: getattr(self, name) for name in _KEY_FIELDS})


class RunStore:
    """The SQLite run store at `path` (conventionally `<out>/ptqbench.sqlite`).

    Opening creates the file (and its folder) when missing and migrates a store of schema
    version 1, 2 or 3 (see `_migrate`); it writes nothing to a current store (the committed demo store
    stays byte for byte). A file that is not a readable run store raises DataError naming it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._open() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, 2, 3, 4, SCHEMA_VERSION):
                raise DataError(
                    f"run store {self.path} has schema version {version}, this ptqbench reads version "
                    f"{SCHEMA_VERSION}; use a new output folder or a matching ptqbench"
                )
            if version == SCHEMA_VERSION:
                return  # a current store is only read here: opening it writes nothing
            conn.execute("PRAGMA journal_mode=WAL")
            with conn:
                conn.execute(_SCHEMA)
                if version in (1, 2, 3, 4):
                    _migrate(conn)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @staticmethod
    def cell_key(*, model: str, checkpoint_sha256: str, task: str, dataset_fingerprint: str, prompts: str,
                 images: int, method: str, bits: str, preset: str, method_config: str, seed: int,
                 calib_fingerprint: str | None, labels: tuple[str, ...] = (), protocol: str = GT_PROTOCOL,
                 detector: str = NO_DETECTOR) -> str:
        """A stable 16-hex-digit hash of what defines a cell; metrics and timings are not part of it.

        images (the number of evaluation images scored) is part of it, so runs with different
        `--limit`s are different cells, and so is the method configuration, so two configurations
        of one method are two cells, and the prompt protocol and detector, so cells of different
        protocols never stand for each other (a gt cell's identity leaves them out, so cells
        stored before protocols existed keep their keys). The order of `labels` does not matter.
        """
        identity = {
            "model": model, "checkpoint_sha256": checkpoint_sha256, "task": task,
            "dataset_fingerprint": dataset_fingerprint, "prompts": prompts, "images": int(images), "method": method,
            "bits": bits, "preset": preset, "method_config": method_config, "seed": int(seed),
            "calib_fingerprint": calib_fingerprint, "labels": sorted(labels),
        }
        if (protocol, detector) != (GT_PROTOCOL, NO_DETECTOR):
            identity.update(protocol=protocol, detector=detector)
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def has(self, key: str) -> bool:
        """Whether a record with cell key `key` exists."""
        with self._open() as conn:
            return conn.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone() is not None

    def get(self, key: str) -> RunRecord | None:
        """The record with cell key `key`, or None."""
        with self._open() as conn:
            row = conn.execute("SELECT * FROM runs WHERE key = ?", (key,)).fetchone()
        return _from_row(row) if row is not None else None

    def put(self, record: RunRecord) -> str:
        """Store `record` in one transaction, replacing an earlier record of the same cell; returns its key."""
        row = _to_row(record)
        columns = ", ".join(row)
        placeholders = ", ".join("?" for _ in row)
        with self._open() as conn, conn:
            conn.execute(f"INSERT OR REPLACE INTO runs ({columns}) VALUES ({placeholders})", tuple(row.values()))
        return row["key"]

    def records(self, task: str | None = None) -> list[RunRecord]:
        """All records (of `task` when given), oldest first (by created_at, then insertion order)."""
        where, params = ("WHERE task = ?", (task,)) if task is not None else ("", ())
        with self._open() as conn:
            rows = conn.execute(f"SELECT * FROM runs {where} ORDER BY created_at, rowid", params).fetchall()
        return [_from_row(row) for row in rows]

    def tasks(self) -> list[str]:
        """The tasks that have records, sorted."""
        with self._open() as conn:
            rows = conn.execute("SELECT DISTINCT task FROM runs ORDER BY task").fetchall()
        return [row["task"] for row in rows]

    @contextmanager
    def _open(self) -> Iterator[sqlite3.Connection]:
        """A short-lived connection; any SQLite failure becomes a DataError naming the file."""
        try:
            conn = sqlite3.connect(self.path, timeout=60.0)
        except sqlite3.Error as exc:
            raise DataError(f"cannot open the run store {self.path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        except sqlite3.DatabaseError as exc:
            raise DataError(
                f"run store {self.path} is unreadable ({exc}); if the file is corrupt, move it aside "
                f"and run again (finished cells will be recomputed)"
            ) from exc
        finally:
            conn.close()


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a schema-1 to 4 store to the current schema and re-key its rows.

    Schema 1's cell keys did not cover `images`, schema 2's had no method configuration, schema
    3's no protocol and detector, schema 4's no bootstrap intervals (added empty: not in the key).
    The configuration column is added as UNRECORDED_CONFIG (what
    those rows ran was not stored), protocol and detector as "gt" and "-" (every earlier row is
    one), and every row's key is computed from its own columns, so the store keeps one row per
    cell. (A schema-1 store kept only the latest of two runs that differed only in `--limit`.)
    """
    columns = {row["name"] for row in conn.execute("PRAGMA table_info(runs)").fetchall()}
    if "method_config" not in columns:
        conn.execute(f"ALTER TABLE runs ADD COLUMN method_config TEXT NOT NULL DEFAULT '{UNRECORDED_CONFIG}'")
    if "protocol" not in columns:
        conn.execute(f"ALTER TABLE runs ADD COLUMN protocol TEXT NOT NULL DEFAULT '{GT_PROTOCOL}'")
        conn.execute(f"ALTER TABLE runs ADD COLUMN detector TEXT NOT NULL DEFAULT '{NO_DETECTOR}'")
    if "intervals" not in columns:
        conn.execute("ALTER TABLE runs ADD COLUMN intervals TEXT NOT NULL DEFAULT '{}'")
        conn.execute("ALTER TABLE runs ADD COLUMN delta_interval TEXT NOT NULL DEFAULT 'null'")
    rows = conn.execute(f"SELECT rowid, {', '.join(_KEY_FIELDS)} FROM runs").fetchall()
    for row in rows:
        identity = {name: row[name] for name in _KEY_FIELDS}
        identity["labels"] = tuple(json.loads(identity["labels"]))
        conn.execute("UPDATE runs SET key = ? WHERE rowid = ?", (RunStore.cell_key(**identity), row["rowid"]))


def _to_row(record: RunRecord) -> dict[str, object]:
    """The SQLite row of `record`: its fields (dicts and labels as JSON) plus the cell key."""
    row: dict[str, object] = {"key": record.key}
    for name, value in asdict(record).items():
        row[name] = json.dumps(list(value) if name == "labels" else value) if name in _JSON_FIELDS else value
    return row


def _from_row(row: sqlite3.Row) -> RunRecord:
    values = {name: row[name] for name in row.keys() if name != "key"}
    values["metrics"] = {k: float(v) for k, v in json.loads(values["metrics"]).items()}
    values["versions"] = json.loads(values["versions"])
    values["labels"] = tuple(json.loads(values["labels"]))
    values["intervals"] = json.loads(values["intervals"])
    values["delta_interval"] = json.loads(values["delta_interval"])
    return RunRecord(**values)


def is_fp(record: RunRecord) -> bool:
    return record.method == FP and record.bits == FP


def cell_folder(fields: dict | RunRecord) -> str:
    """The name of a cell's artefact folder under `<out>/runs/`: `<model>-<task>-<method>-<bits>-<preset>-<key[:8]>`
    (fields: `RunStore.cell_key`'s arguments, or a stored record)."""
    if isinstance(fields, RunRecord):
        fields = {name: getattr(fields, name) for name in _KEY_FIELDS}
    key = RunStore.cell_key(**{name: fields[name] for name in _KEY_FIELDS})
    return f"{fields['model']}-{fields['task']}-{fields['method']}-{fields['bits']}-{fields['preset']}-{key[:8]}"


def evaluation_key(record: RunRecord) -> tuple:
    """What fixed the evaluation of `record` (`_EVALUATION_FIELDS`); its FP row shares it."""
    return tuple(getattr(record, name) for name in _EVALUATION_FIELDS)


def _order(record: RunRecord) -> tuple:
    """Sort key: the rows of one evaluation together (model, checkpoint, dataset, protocol,
    detector, prompts, images), its FP row first, then methods by name, bits numerically, preset and seed."""
    w_bits = record.w_bits if record.w_bits is not None else math.inf
    a_bits = record.a_bits if record.a_bits is not None else math.inf
    return (*evaluation_key(record), not is_fp(record), record.method, w_bits, a_bits, record.bits, record.preset,
            record.method_config, record.seed, record.labels)


def _short_hash(value: str) -> str:
    """The first 8 characters of a hexadecimal hash; any other value (e.g. "untrained-seed0") as is."""
    is_hex = all(char in "0123456789abcdef" for char in value.lower())
    return value[:8] if is_hex else value


def _detector_column(detector: str) -> str:
    """The leaderboard's detector column: "<name>@<short weights hash>", "-" or "user"."""
    name, at, weights = detector.rpartition("@")
    return f"{name}@{_short_hash(weights)}" if at else detector


def _config_column(method_config: str) -> str:
    """The leaderboard's config column: the configuration's short hash, "-" where there is none."""
    return "-" if method_config in (UNRECORDED_CONFIG, NO_OPTIONS_JSON) else config_id(method_config)


def _interval_columns(record: RunRecord) -> dict[str, float | None]:
    """The headline's bootstrap interval and the paired interval of its difference to FP (None where absent)."""
    low, high = record.intervals.get(record.metric, (None, None))
    delta_low, delta_high = record.delta_interval if record.delta_interval is not None else (None, None)
    if is_fp(record):
        delta_low, delta_high = (0.0, 0.0) if record.intervals else (None, None)
    return {"ci_low": low, "ci_high": high, "delta_ci_low": delta_low, "delta_ci_high": delta_high}


def leaderboard_frame(store: RunStore, task: str, *, by_seed: bool = False) -> pd.DataFrame:
    """The leaderboard of `task`: one row per setting of the store, its seeds merged
    (`seed_statistics.mean_over_seeds`: mean values, `<headline>_std`, `seeds`); with `by_seed`,
    one row per cell (rows of different settings never replace each other, a `seed` column).
    Rows are grouped by evaluation, the FP row first.

    delta_vs_fp is the headline metric minus that of the most recent FP record (method and bits
    "fp") of the same evaluation: model, checkpoint, dataset fingerprint (which covers the
    split), protocol, detector, prompts and evaluated images; empty without one.
    Columns: model, method, bits, w_bits, a_bits, preset, config (the short hash of the method's
    configuration, `config_id`; "-" for fp, for methods without settings and for rows stored before
    configurations were recorded), <metrics, headline first>, delta_vs_fp, ci_low / ci_high (the
    headline's 95% bootstrap interval), delta_ci_low / delta_ci_high (the paired interval of
    delta_vs_fp; [0, 0] on the FP row), calib_s, eval_s, images, seed, protocol, detector
    ("<name>@<short weights sha256>", "user" or "-"), prompts, checkpoint (short sha256), dataset
    (short fingerprint), and labels when any row has labels.
    """
    records = store.records(task)
    if not records:
        raise DataError(f"no runs of task {task!r} in {store.path}; tasks with runs: {store.tasks() or 'none'}")
    fp_reference = {evaluation_key(record): record for record in records if is_fp(record)}  # oldest first: latest wins
    rows = sorted(records, key=_order)
    metric_names: list[str] = []
    for record in rows:
        for name in (record.metric, *record.metrics):
            if name not in metric_names:
                metric_names.append(name)
    table = []
    for record in rows:
        fp = fp_reference.get(evaluation_key(record))
        delta = None
        if fp is not None and record.metric in fp.metrics:
            delta = record.metrics[record.metric] - fp.metrics[record.metric]
        table.append({
            "model": record.model, "method": record.method, "bits": record.bits,
            "w_bits": record.w_bits, "a_bits": record.a_bits, "preset": record.preset,
            "config": _config_column(record.method_config),
            **{name: record.metrics.get(name) for name in metric_names},
            "delta_vs_fp": delta, **_interval_columns(record),
            "calib_s": record.calib_s, "eval_s": record.eval_s,
            "images": record.images, "seed": record.seed, "protocol": record.protocol,
            "detector": _detector_column(record.detector), "prompts": record.prompts,
            "checkpoint": _short_hash(record.checkpoint_sha256), "dataset": _short_hash(record.dataset_fingerprint),
            "labels": ",".join(record.labels),
        })
    frame = pd.DataFrame(table)
    for column in ("w_bits", "a_bits", "images", "seed"):
        frame[column] = frame[column].astype("Int64")
    for column in (*metric_names, "delta_vs_fp", *INTERVAL_COLUMNS):
        frame[column] = frame[column].astype("float64")
    if not frame["labels"].astype(bool).any():
        frame = frame.drop(columns="labels")
    if by_seed:
        return frame
    settings = [RunStore.cell_key(**{**{name: getattr(record, name) for name in _KEY_FIELDS},
                                     "seed": 0, "calib_fingerprint": None}) for record in rows]
    return mean_over_seeds(frame, settings, metric_names, records[-1].metric)


def _markdown(frame: pd.DataFrame) -> str:
    """A GitHub-style table; numbers with two decimals, missing values empty."""
    cells = frame.astype(object).where(frame.notna(), None)
    return cells.to_markdown(index=False, tablefmt="github", floatfmt=".2f", missingval="")


def format_leaderboard(store: RunStore, task: str | None = None, *, by_seed: bool = False) -> str:
    """The leaderboard(s) as text for the terminal: one titled table per task (all tasks when None),
    seeds merged (one row per seed with `by_seed`)."""
    tasks = [task] if task is not None else store.tasks()
    if not tasks:
        raise DataError(f"no runs in {store.path}")
    sections = []
    for name in tasks:
        frame = leaderboard_frame(store, name, by_seed=by_seed)
        headline = store.records(name)[-1].metric
        sections.append(f"{name} (headline: {headline})\n{_markdown(frame)}")
    return "\n\n".join(sections)


def write_leaderboards(store: RunStore, out_dir: str | Path, task: str | None = None) -> list[Path]:
    """Regenerate `<out_dir>/leaderboard_<task>.csv` and `.md` (seeds merged) and
    `leaderboard_<task>_by_seed.csv` (one row per cell) for `task` (every task when None).

    The CSVs keep 4 decimals, the Markdown 2. Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in [task] if task is not None else store.tasks():
        frame = leaderboard_frame(store, name)
        headline = store.records(name)[-1].metric
        csv_path, md_path = out / f"leaderboard_{name}.csv", out / f"leaderboard_{name}.md"
        by_seed_path = out / f"leaderboard_{name}_by_seed.csv"
        write_text_atomic(csv_path, frame.to_csv(index=False, float_format="%.4f", lineterminator="\n"))
        write_text_atomic(by_seed_path, leaderboard_frame(store, name, by_seed=True).to_csv(
            index=False, float_format="%.4f", lineterminator="\n"))
        write_text_atomic(md_path, (
            f"# Leaderboard: {name}\n\n"
            f"Headline metric: `{headline}`. `delta_vs_fp` is the headline metric minus that of the FP row "
            f"of the same model, checkpoint, dataset, protocol, detector, prompts and images. Cells that "
            f"differ only in their calibration seed are one row: the mean over `seeds`, and "
            f"`{headline}_std` their standard deviation (one row per seed: `{by_seed_path.name}`).\n\n"
            f"{_markdown(frame)}\n"
        ))
        written += [csv_path, md_path, by_seed_path]
    return written
