"""The leaderboard over calibration seeds: the cells of one setting that differ only in their seed,
merged into one row with the mean of every number and the standard deviation of the headline.

A seed is a calibration draw (which images, which prompts, every random choice of the method;
`RunConfig.seeds`), so the spread over seeds is how much a row would move with another draw. The
per-seed rows stay available (`leaderboard_frame(..., by_seed=True)`, `ptqbench leaderboard
--by-seed`, `leaderboard_<task>_by_seed.csv`).
"""

from __future__ import annotations

import pandas as pd

AVERAGED_COLUMNS = ("delta_vs_fp", "calib_s", "eval_s")
# Bootstrap intervals are of one cell's evaluation: kept for a single seed, empty for a mean.
INTERVAL_COLUMNS = ("ci_low", "ci_high", "delta_ci_low", "delta_ci_high")


def mean_over_seeds(frame: pd.DataFrame, settings: list[str], metric_names: list[str], headline: str) -> pd.DataFrame:
    """One row per setting of a per-seed leaderboard frame, in the order of its first row.

    frame: `leaderboard_frame(..., by_seed=True)` (a `seed` column, one row per cell); settings:
    per row, its cell's identity without the seed and the calibration draw (rows of one setting
    and distinct seeds merge; a seed met twice in a setting, e.g. under two calibration sizes,
    starts another row); metric_names: the metric columns, headline first. The result replaces
    `seed` with `seeds` (the seeds, comma-separated, in the frame's order), averages the metrics,
    delta_vs_fp, calib_s and eval_s, and adds `<headline>_std` after the headline: the sample
    standard deviation over the seeds (empty for a single seed). The bootstrap interval columns
    stay for a single seed and are empty for a mean of several (each is one evaluation's).
    """
    setting = pd.Series(settings, index=frame.index, name="_setting")
    occurrence = frame.groupby([setting, frame["seed"]], sort=False).cumcount().rename("_occurrence")
    grouped = frame.groupby([setting, occurrence], sort=False)
    first = grouped.head(1).reset_index(drop=True)
    numbers = [*metric_names, *AVERAGED_COLUMNS]
    merged = first.drop(columns=numbers)
    merged[numbers] = grouped[numbers].mean().reset_index(drop=True)
    merged[f"{headline}_std"] = grouped[headline].std(ddof=1).reset_index(drop=True)
    several = (grouped["seed"].count() > 1).reset_index(drop=True)
    for column in INTERVAL_COLUMNS:
        if column in merged.columns:
            merged.loc[several, column] = float("nan")
    merged["seeds"] = grouped["seed"].agg(lambda seeds: ",".join(str(seed) for seed in seeds)).reset_index(drop=True)
    order = []
    for column in frame.columns:
        if column == "seed":
            order.append("seeds")
        else:
            order.append(column)
        if column == headline:
            order.append(f"{headline}_std")
    return merged[order]
