"""The report's figures, drawn with matplotlib from a task's leaderboard frame.

Each function takes the rows of one evaluation (one model, checkpoint, dataset, protocol, prompts
and image count: the rows that share an FP reference, `evaluation_groups`) and returns a matplotlib
Figure; `ptqbench.report.page` saves them as PNGs and inlines them into the HTML page.

Where a frame has the interval columns (`ci_low`, `ci_high` of the headline metric, `delta_ci_low`,
`delta_ci_high` of the paired difference to FP) they are drawn as error bars; without them the
points stand alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd

EVALUATION_COLUMNS = ("model", "checkpoint", "dataset", "protocol", "detector", "prompts", "images")
FP = "fp"


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def evaluation_groups(frame: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """(title, rows) per evaluation of a leaderboard frame, in the frame's order; the title names
    the model, dataset, protocol and image count."""
    columns = [name for name in EVALUATION_COLUMNS if name in frame.columns]
    for values, rows in frame.groupby(columns, sort=False, dropna=False):
        settings = dict(zip(columns, values))
        title = (f"{settings.get('model')} · dataset {settings.get('dataset')} · "
                 f"{settings.get('protocol', 'gt')} prompts · {settings.get('images')} images")
        yield title, rows


def _bit_order(rows: pd.DataFrame) -> list[str]:
    """The quantized rows' bit labels, by weight then activation bits."""
    quantized = rows[rows["bits"] != FP]
    ordered = quantized.sort_values(["w_bits", "a_bits"], kind="stable")
    return list(dict.fromkeys(ordered["bits"]))


def _interval(rows: pd.DataFrame, value: str, low: str, high: str) -> list[list[float]] | None:
    """Matplotlib's asymmetric error-bar lengths [[below], [above]] from interval columns, or None."""
    if low not in rows.columns or high not in rows.columns or rows[low].isna().all():
        return None
    return [list((rows[value] - rows[low]).fillna(0.0)), list((rows[high] - rows[value]).fillna(0.0))]


def metric_vs_bits(rows: pd.DataFrame, metric: str, title: str):
    """The headline metric against bit width, one line per method, the FP value as a dashed line."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    labels = _bit_order(rows)
    positions = {label: index for index, label in enumerate(labels)}
    methods = rows[rows["bits"] != FP].groupby("method", sort=True)
    for k, (method, method_rows) in enumerate(methods):
        dodge = (k - (methods.ngroups - 1) / 2) * 0.06  # side by side, so that the error bars stay apart
        method_rows = method_rows.drop_duplicates("bits", keep="last")
        method_rows = method_rows.assign(x=method_rows["bits"].map(positions) + dodge).sort_values("x")
        axes.errorbar(method_rows["x"], method_rows[metric], yerr=_interval(method_rows, metric, "ci_low", "ci_high"),
                      marker="o", capsize=3, label=method)
    fp_rows = rows[rows["bits"] == FP]
    if not fp_rows.empty:
        axes.axhline(float(fp_rows[metric].iloc[-1]), color="black", linestyle="--", linewidth=1, label="fp")
    axes.set_xticks(range(len(labels)), labels)
    axes.set_xlabel("bit width")
    axes.set_ylabel(metric)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def delta_bars(rows: pd.DataFrame, metric: str, title: str):
    """delta_vs_fp per (method, bits) as horizontal bars, with the paired interval where known."""
    plt = pyplot()
    quantized = rows[rows["bits"] != FP].dropna(subset=["delta_vs_fp"])
    figure, axes = plt.subplots(figsize=(6.4, 1.2 + 0.32 * max(len(quantized), 1)), dpi=100)
    names = [f"{method} {bits}" for method, bits in zip(quantized["method"], quantized["bits"])]
    errors = _interval(quantized, "delta_vs_fp", "delta_ci_low", "delta_ci_high")
    colors = ["tab:red" if value < 0 else "tab:green" for value in quantized["delta_vs_fp"]]
    axes.barh(range(len(names)), quantized["delta_vs_fp"], xerr=errors, color=colors, capsize=3)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.invert_yaxis()
    axes.axvline(0.0, color="black", linewidth=1)
    axes.set_xlabel(f"{metric} minus FP")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def calibration_time(rows: pd.DataFrame, metric: str, title: str):
    """Calibration seconds (log scale) against the headline metric, one marker per cell."""
    plt = pyplot()
    quantized = rows[rows["bits"] != FP]
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for method, method_rows in quantized.groupby("method", sort=True):
        axes.scatter(method_rows["calib_s"].clip(lower=1e-2), method_rows[metric], label=method)
        for seconds, value, bits in zip(method_rows["calib_s"], method_rows[metric], method_rows["bits"]):
            axes.annotate(bits, (max(seconds, 1e-2), value), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.set_xscale("log")
    axes.set_xlabel("calibration time (s, log scale)")
    axes.set_ylabel(metric)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure
