"""Loading and comparing the reference-parity fixtures of `tests/parity/` (see its README).

The fixtures are numbers the reference code (SAQ-SAM @14b7055, PTQ4SAM @ef2049e) produced on
seeded inputs; `compare` applies a fixture's tolerance rule to ptqbench's outputs and returns one
line per mismatching key (an empty list means parity).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PARITY = Path(__file__).resolve().parent / "parity"


def manifest() -> list[dict]:
    """Every fixture entry of the manifest, in file order."""
    return json.loads((PARITY / "manifest.json").read_text())["fixtures"]


def fixtures_of(*kinds: str, gated_only: bool = True) -> list[dict]:
    """The fixtures of the given kinds (gated ones only by default)."""
    return [f for f in manifest() if f["kind"] in kinds and (f.get("gate", True) or not gated_only)]


def load(fixture: dict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, expected) arrays of a fixture."""
    with np.load(PARITY / fixture["inputs_file"]) as data:
        inputs = {key: data[key] for key in fixture["inputs"]}
    with np.load(PARITY / fixture["file"]) as data:
        expected = {key: data[key] for key in data.files}
    return inputs, expected


def _elementwise(name: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> str | None:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return f"{name}: shape {got.shape} != {want.shape}"
    excess = np.abs(got - want) - (atol + rtol * np.abs(want))
    if np.all(excess <= 0):
        return None
    worst = int(np.argmax(excess))
    return (f"{name}: {int(np.sum(excess > 0))} of {want.size} elements outside atol {atol} + rtol {rtol} "
            f"(worst: got {got.flat[worst]!r}, want {want.flat[worst]!r})")


def compare(fixture: dict, got: dict[str, np.ndarray], expected: dict[str, np.ndarray],
            data_range: float | None = None) -> list[str]:
    """Mismatch lines of `got` against the fixture's expected keys under its tolerance rule.

    Element-wise rules (`atol`/`rtol`, `per_key` prefixes, `exact`) apply to every expected key.
    Range-search rules (`atol_rel_range`, `scale_rtol`, `zp_atol`) need `data_range` (max - min
    over every call). AGQ rules (`scale_rtol`, `error_rtol`, `tau_exact`) apply to its keys.
    """
    tolerance = fixture["tolerance"]
    keys = fixture["expected"]
    problems = []
    for key in keys:
        if key not in got:
            problems.append(f"{key}: not produced")
            continue
        want = expected[key]
        if tolerance.get("exact"):
            if not np.array_equal(np.asarray(got[key]), want):
                problems.append(f"{key}: got {np.asarray(got[key])!r}, want {want!r} (exact)")
            continue
        if "atol_rel_range" in tolerance:
            rule = {"min_val": (tolerance["atol_rel_range"] * data_range, 0.0),
                    "max_val": (tolerance["atol_rel_range"] * data_range, 0.0),
                    "scale": (0.0, tolerance["scale_rtol"]), "zero_point": (tolerance["zp_atol"], 0.0)}[key]
        elif "error_rtol" in tolerance:
            rule = {"best_tau_scales": (0.0, tolerance["scale_rtol"]), "scale": (0.0, tolerance["scale_rtol"]),
                    "tau_errors": (0.0, tolerance["error_rtol"]), "tau": (0.0, 0.0)}[key]
        else:
            rule = (tolerance["atol"], tolerance["rtol"])
            for prefix, override in tolerance.get("per_key", {}).items():
                if key.startswith(prefix):
                    rule = (override.get("atol", rule[0]), override.get("rtol", rule[1]))
        problem = _elementwise(key, got[key], want, *rule)
        if problem:
            problems.append(problem)
    return problems
