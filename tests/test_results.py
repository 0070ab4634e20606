"""The SQLite run store and the leaderboard export."""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from ptqbench import results
from ptqbench.errors import DataError
from ptqbench.results import STORE_FILENAME, RunRecord, RunStore, format_leaderboard, write_leaderboards


def _record(method: str = "fp", bits: str = "fp", ap: float = 40.0, **changes) -> RunRecord:
    w_bits, a_bits = (None, None) if bits == "fp" else (int(bits[1:].split("A")[0]), int(bits.split("A")[1]))
    base = RunRecord(
        model="sam_tiny", checkpoint_sha256="c0ffee", task="coco", dataset_fingerprint="d1", prompts="gt",
        method=method, bits=bits, w_bits=w_bits, a_bits=a_bits, preset="default", method_config="{}",
        seed=0, calib_fingerprint=None if method == "fp" else "cal1",
        metrics={"mask_AP": ap, "mask_AP50": ap + 10.0}, metric="mask_AP",
        calib_s=1.5, eval_s=2.25, images=5, peak_mem_mb=None, device="cpu",
        versions={"torch": "2.3.0", "ptqbench": "0.1.0"}, git_commit=None,
        created_at="2024-01-01T00:00:00+00:00",
    )
    return replace(base, **changes)


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore(tmp_path / STORE_FILENAME)


def test_round_trip(store):
    record = _record("saqsam", "W4A8", 31.25, peak_mem_mb=123.5, git_commit="abc123", labels=("untrained",))
    key = store.put(record)
    assert key == record.key and store.has(key) and not store.has("0" * 16)
    assert store.get(key) == record
    assert store.get("0" * 16) is None
    assert store.records() == [record] and store.records("ade20k") == []
    assert store.tasks() == ["coco"]


def test_wal_mode_and_one_row_per_cell(store):
    store.put(_record())
    store.put(_record(ap=41.0, created_at="2024-01-02T00:00:00+00:00"))  # same cell: replaced
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1
    assert store.get(_record().key).metrics["mask_AP"] == 41.0


def test_cell_key_is_stable_and_covers_the_identity():
    record = _record("minmax", "W4A4")
    identity = {
        "model": "sam_tiny", "checkpoint_sha256": "c0ffee", "task": "coco", "dataset_fingerprint": "d1",
        "prompts": "gt", "images": 5, "method": "minmax", "bits": "W4A4", "preset": "default",
        "method_config": "{}", "seed": 0, "calib_fingerprint": "cal1", "labels": [],
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    assert record.key == hashlib.sha256(canonical).hexdigest()[:16]
    # pinned: changing the key format needs a store migration (see test_old_stores_are_migrated)
    assert record.key == "4f2e62cce976fee3"
    # results and timings are not part of the identity
    assert replace(record, metrics={"mask_AP": 1.0}, calib_s=9.0, created_at="2030-01-01").key == record.key
    assert replace(record, labels=("b", "a")).key == replace(record, labels=("a", "b")).key
    changed = [replace(record, **{name: value}).key for name, value in [
        ("model", "sam_vit_b"), ("checkpoint_sha256", "beef"), ("dataset_fingerprint", "d2"),
        ("prompts", "det"), ("method", "brecq"), ("bits", "W4A8"), ("preset", "fast"), ("seed", 1),
        ("calib_fingerprint", "cal2"), ("labels", ("untrained",)), ("task", "dota"), ("images", 2),
        ("method_config", '{"p":2.0}'),
    ]]
    assert len(set(changed)) == len(changed) and record.key not in changed


def test_record_validates_headline():
    with pytest.raises(ValueError, match="mask_mIoU"):
        _record(metric="mask_mIoU")


def test_existing_rows_survive_new_puts(store):
    first = [_record("minmax", f"W{b}A{b}", 30.0 + b) for b in (4, 6, 8)]
    for record in first:
        store.put(record)
    store.put(_record("brecq", "W4A4", 35.0))
    reopened = RunStore(store.path)
    assert [r.key for r in reopened.records()] == [r.key for r in first] + [_record("brecq", "W4A4").key]
    assert all(reopened.get(r.key) == r for r in first)


def test_concurrent_stores_on_one_file(tmp_path):
    path = tmp_path / STORE_FILENAME
    a, b = RunStore(path), RunStore(path)
    a.put(_record())
    b.put(_record("minmax", "W8A8", 39.0))
    assert {r.method for r in a.records()} == {"fp", "minmax"}

    def writer(seed: int) -> None:
        store = RunStore(path)
        for i in range(10):
            store.put(_record("minmax", "W4A4", float(i), seed=100 * seed + i))

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(RunStore(path).records()) == 2 + 40


def test_corrupt_store_raises_data_error(tmp_path):
    path = tmp_path / STORE_FILENAME
    path.write_bytes(b"this is not an sqlite database, just some bytes " * 100)
    with pytest.raises(DataError) as err:
        RunStore(path)
    assert str(path) in str(err.value) and "move it aside" in str(err.value)


def test_store_of_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / STORE_FILENAME
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 7")
    with pytest.raises(DataError, match="schema version 7"):
        RunStore(path)


_SCHEMA_1 = """CREATE TABLE runs (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, checkpoint_sha256 TEXT NOT NULL, task TEXT NOT NULL,
    dataset_fingerprint TEXT NOT NULL, prompts TEXT NOT NULL, method TEXT NOT NULL, bits TEXT NOT NULL,
    w_bits INTEGER, a_bits INTEGER, preset TEXT NOT NULL, seed INTEGER NOT NULL, calib_fingerprint TEXT,
    metrics TEXT NOT NULL, metric TEXT NOT NULL, calib_s REAL NOT NULL, eval_s REAL NOT NULL,
    images INTEGER NOT NULL, peak_mem_mb REAL, device TEXT NOT NULL, versions TEXT NOT NULL, git_commit TEXT,
    labels TEXT NOT NULL, created_at TEXT NOT NULL)"""


def _old_key(record: RunRecord, schema: int) -> str:
    """The cell key ptqbench wrote into schema-1 stores (no `images`) and schema-2 stores (no
    `method_config`)."""
    identity = {name: getattr(record, name) for name in (
        "model", "checkpoint_sha256", "task", "dataset_fingerprint", "prompts", "method", "bits", "preset",
        "seed", "calib_fingerprint", *(("images",) if schema == 2 else ()))}
    identity["labels"] = sorted(record.labels)
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


@pytest.mark.parametrize("schema", [1, 2, 3, 4])
def test_old_stores_are_migrated(tmp_path, schema):
    """Schema 1 (keys without `images`), 2 (no method configuration; the same table), 3 (no
    protocol or detector) and 4 (no bootstrap intervals) become schema 5: their rows get the
    configuration "unrecorded" (1, 2), protocol "gt" and detector "-", no intervals, and keys
    computed from their columns (a schema-3 or 4 row keeps its key: a gt cell's identity leaves the
    protocol out, and intervals are not part of it)."""
    old = [_record(), _record("minmax", "W4A4", 30.0, labels=("untrained",)), _record("minmax", "W8A8", 39.0)]
    assert _old_key(replace(old[1], labels=()), 1) == "b4883e9b117da6dc"  # the key schema 1 pinned
    path = tmp_path / STORE_FILENAME
    with sqlite3.connect(path) as conn:
        conn.execute(_SCHEMA_1)
        if schema >= 3:
            conn.execute("ALTER TABLE runs ADD COLUMN method_config TEXT NOT NULL DEFAULT ''")
        if schema == 4:
            conn.execute("ALTER TABLE runs ADD COLUMN protocol TEXT NOT NULL DEFAULT 'gt'")
            conn.execute("ALTER TABLE runs ADD COLUMN detector TEXT NOT NULL DEFAULT '-'")
        for record in old:
            row = results._to_row(record)
            dropped = ("intervals", "delta_interval", *(("protocol", "detector") if schema < 4 else ()),
                       *(("method_config",) if schema < 3 else ()))
            for name in dropped:
                del row[name]
            row["key"] = _old_key(record, schema) if schema < 3 else record.key
            conn.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                         tuple(row.values()))
        conn.execute(f"PRAGMA user_version = {schema}")
    store = RunStore(path)
    migrated = old if schema >= 3 else [replace(r, method_config=results.UNRECORDED_CONFIG) for r in old]
    assert store.records() == migrated
    assert all(store.has(r.key) and store.get(r.key) == r for r in migrated)
    assert all(r.protocol == "gt" and r.detector == "-" for r in store.records())
    if schema < 3:
        assert not any(store.has(_old_key(r, schema)) for r in old)
        store.put(_record("minmax", "W8A8", 37.0))  # a run that recorded its configuration is another cell
    store.put(_record("minmax", "W8A8", 38.0, images=2))  # so is a --limit 2 run
    store.put(_record("minmax", "W8A8", 36.0, protocol="paper", detector="fasterrcnn_resnet50_fpn@ab12"))
    assert len(RunStore(path).records()) == (6 if schema < 3 else 5)
    assert store.get(migrated[2].key).metrics["mask_AP"] == 39.0
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == results.SCHEMA_VERSION == 5
    frame = results.leaderboard_frame(store, "coco")
    assert len(frame) == len(store.records()) and set(frame["config"]) == {"-"}
    assert set(frame["protocol"]) == {"gt", "paper"} and "fasterrcnn_resnet50_fpn@ab12" in set(frame["detector"])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_leaderboard_rows_order_and_delta(store, tmp_path):
    store.put(_record("minmax", "W8A8", 39.5))
    store.put(_record("fp", "fp", 40.0))
    store.put(_record("minmax", "W10A10", 39.75))
    store.put(_record("brecq", "W4A4", 30.0))
    store.put(_record("minmax", "W4A4", 10.0))
    # another seed is another cell: both rows are shown
    store.put(_record("minmax", "W4A4", 20.0, seed=1, created_at="2024-02-01T00:00:00+00:00"))
    # an FP row of other prompts is shown too, and is the reference of its own prompts' rows only
    store.put(_record("fp", "fp", 10.0, prompts="det"))
    store.put(_record("ptq4sam", "W4A4", 12.0, prompts="det"))
    # so is an FP row of fewer images (a --limit run)
    store.put(_record("fp", "fp", 50.0, images=2))
    store.put(_record("minmax", "W4A4", 45.0, images=2))
    store.put(_record("minmax", "W4A4", 12.0, task="dota", metrics={"mAP50": 12.0}, metric="mAP50"))

    written = write_leaderboards(store, tmp_path / "out")
    assert sorted(p.name for p in written) == [
        "leaderboard_coco.csv", "leaderboard_coco.md", "leaderboard_coco_by_seed.csv",
        "leaderboard_dota.csv", "leaderboard_dota.md", "leaderboard_dota_by_seed.csv"]
    merged = _read_csv(tmp_path / "out" / "leaderboard_coco.csv")
    assert list(merged[0]) == ["model", "method", "bits", "w_bits", "a_bits", "preset", "config", "mask_AP",
                               "mask_AP_std", "mask_AP50", "delta_vs_fp", "ci_low", "ci_high", "delta_ci_low",
                               "delta_ci_high", "calib_s", "eval_s", "images", "seeds", "protocol", "detector",
                               "prompts", "checkpoint", "dataset"]
    assert [(r["images"], r["method"], r["bits"], r["seeds"], r["mask_AP"], r["mask_AP_std"], r["delta_vs_fp"])
            for r in merged if r["prompts"] == "gt" and r["images"] == "5"] == [
        ("5", "fp", "fp", "0", "40.0000", "", "0.0000"), ("5", "brecq", "W4A4", "0", "30.0000", "", "-10.0000"),
        ("5", "minmax", "W4A4", "0,1", "15.0000", "7.0711", "-25.0000"),
        ("5", "minmax", "W8A8", "0", "39.5000", "", "-0.5000"),
        ("5", "minmax", "W10A10", "0", "39.7500", "", "-0.2500")]
    rows = _read_csv(tmp_path / "out" / "leaderboard_coco_by_seed.csv")
    assert list(rows[0]) == ["model", "method", "bits", "w_bits", "a_bits", "preset", "config", "mask_AP",
                             "mask_AP50", "delta_vs_fp", "ci_low", "ci_high", "delta_ci_low", "delta_ci_high",
                             "calib_s", "eval_s", "images", "seed", "protocol", "detector", "prompts", "checkpoint",
                             "dataset"]
    assert [(r["prompts"], r["images"], r["method"], r["bits"], r["seed"], r["delta_vs_fp"]) for r in rows] == [
        ("det", "5", "fp", "fp", "0", "0.0000"), ("det", "5", "ptq4sam", "W4A4", "0", "2.0000"),
        ("gt", "2", "fp", "fp", "0", "0.0000"), ("gt", "2", "minmax", "W4A4", "0", "-5.0000"),
        ("gt", "5", "fp", "fp", "0", "0.0000"), ("gt", "5", "brecq", "W4A4", "0", "-10.0000"),
        ("gt", "5", "minmax", "W4A4", "0", "-30.0000"), ("gt", "5", "minmax", "W4A4", "1", "-20.0000"),
        ("gt", "5", "minmax", "W8A8", "0", "-0.5000"), ("gt", "5", "minmax", "W10A10", "0", "-0.2500"),
    ]
    assert {(r["model"], r["checkpoint"], r["dataset"]) for r in rows} == {("sam_tiny", "c0ffee", "d1")}
    assert rows[7]["mask_AP"] == "20.0000" and rows[7]["mask_AP50"] == "30.0000"
    assert rows[0]["w_bits"] == "" and rows[1]["w_bits"] == "4"
    dota = _read_csv(tmp_path / "out" / "leaderboard_dota.csv")
    assert len(dota) == 1 and dota[0]["delta_vs_fp"] == "" and dota[0]["mAP50"] == "12.0000"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written)  # no temp files


def test_delta_needs_the_fp_row_of_the_same_evaluation(store):
    store.put(_record("fp", "fp", 40.0, images=2))
    for changes in ({"images": 3}, {"prompts": "det"}, {"checkpoint_sha256": "beef"}, {"dataset_fingerprint": "d2"}):
        store.put(_record("minmax", "W8A8", 39.0, **changes))
    frame = results.leaderboard_frame(store, "coco")
    assert frame["delta_vs_fp"].isna().sum() == 4 and frame["delta_vs_fp"].notna().sum() == 1


def test_leaderboard_labels_column_and_markdown(store, tmp_path):
    sha256 = "0123456789abcdef" * 4
    store.put(_record(checkpoint_sha256=sha256))
    store.put(_record("qdrop", "W4A4", 25.0, checkpoint_sha256=sha256, labels=("leaky-qdrop", "untrained")))
    store.put(_record(checkpoint_sha256="untrained-seed0", dataset_fingerprint="0123456789abcdef"))
    write_leaderboards(store, tmp_path, task="coco")
    rows = _read_csv(tmp_path / "leaderboard_coco.csv")
    assert [(r["checkpoint"], r["dataset"], r["labels"]) for r in rows] == [
        ("01234567", "d1", ""), ("01234567", "d1", "leaky-qdrop,untrained"), ("untrained-seed0", "01234567", "")]
    markdown = (tmp_path / "leaderboard_coco.md").read_text()
    assert markdown.startswith("# Leaderboard: coco\n")
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table_lines) == 5
    cells = [cell.strip() for cell in table_lines[3].strip("|").split("|")]
    assert cells[:3] == ["sam_tiny", "qdrop", "W4A4"] and "25.00" in cells and "-15.00" in cells
    assert cells[-8:] == ["5", "0", "gt", "-", "gt", "01234567", "d1", "leaky-qdrop,untrained"]
    assert format_leaderboard(store, "coco").splitlines()[0] == "coco (headline: mask_AP)"
    assert table_lines[3] in format_leaderboard(store)


def test_leaderboard_rewrite_replaces_file(store, tmp_path):
    store.put(_record())
    write_leaderboards(store, tmp_path)
    store.put(_record("minmax", "W8A8", 38.0))
    write_leaderboards(store, tmp_path)
    assert [r["method"] for r in _read_csv(tmp_path / "leaderboard_coco.csv")] == ["fp", "minmax"]


def test_leaderboard_of_unknown_task(store):
    store.put(_record())
    with pytest.raises(DataError, match="'ade20k'.*coco"):
        format_leaderboard(store, "ade20k")
    with pytest.raises(DataError, match="no runs"):
        format_leaderboard(RunStore(store.path.with_name("empty.sqlite")))


DEMO = Path(__file__).resolve().parents[1] / "results" / "demo"


def test_committed_demo_store_renders_the_committed_leaderboards_and_stays_unchanged(tmp_path):
    """`ptqbench leaderboard --out results/demo` in a fresh clone: the committed store is read
    without a byte changing, and it renders exactly the committed leaderboards."""
    before = (DEMO / STORE_FILENAME).read_bytes()
    written = write_leaderboards(RunStore(DEMO / STORE_FILENAME), tmp_path)
    assert (DEMO / STORE_FILENAME).read_bytes() == before
    assert sorted(path.name for path in written) == sorted(
        path.name for path in DEMO.iterdir() if path.name.startswith("leaderboard_"))
    for path in written:
        assert path.read_text() == (DEMO / path.name).read_text(), path.name
