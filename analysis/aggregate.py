"""Per-cell aggregates over seeds, bootstrap intervals and the tuning playbook's isolation.

A cell is one point of the swept grid: every swept axis but `seed`. The metric statistics of a cell are taken
over its seeds that completed without diverging: a diverged trial has no final metric worth averaging (its
objective is the divergence penalty), so it counts in the divergence rate instead. A cell whose every seed
diverged has NaN statistics and `all_diverged` True.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from analysis.collect import StudyTables

N_BOOT = 10_000  # bootstrap resamples
BOOT_SEED = 0  # every cell is resampled from this seed, so its interval does not depend on the other cells
DERIVED_AXES = ("setting",)  # computed from the swept optimiser axes (Miyato et al.'s A-F)

SUMMARY_COLUMNS = {
    "n_seeds": "trials in the cell (all statuses)",
    "n_complete": "trials finished or diverged",
    "n_diverged": "trials that diverged",
    "n_running": "trials still running",
    "n_failed": "trials that failed (crashed, not diverged)",
    "divergence_rate": "n_diverged / n_complete (NaN when none complete)",
    "all_diverged": "every complete seed diverged",
    "median": "median final metric over seeds that completed without diverging",
    "mean": "mean of the same",
    "std": "sample standard deviation (ddof=1) of the same, NaN below 2 seeds",
    "best": "lowest best_metric over the cell's trials (before any divergence)",
    "median_divergence_step": "median iteration of divergence over diverged seeds",
    "ci_low": "2.5% bound of the bootstrap 95% interval of the median",
    "ci_high": "97.5% bound of the same",
}


class AxisError(ValueError):
    """An axis the study did not sweep."""


def check_axes(tables: StudyTables, axes: Sequence[str]) -> None:
    """Raise AxisError naming each axis that is neither swept by the study nor derived (`setting`)."""
    valid = available_axes(tables)
    unknown = [a for a in axes if a not in valid]
    if unknown:
        raise AxisError(
            f"axis {', '.join(map(repr, unknown))} was not swept by study {tables.meta['study']!r}; "
            f"valid axes: {', '.join(valid) if valid else 'none'}"
        )


def available_axes(tables: StudyTables) -> list[str]:
    """Swept axes with a column in `trials`, plus `setting` when any trial matches Miyato et al.'s A-F."""
    axes = [a for a in tables.axes if a in tables.trials.columns]
    if (tables.trials["setting"] != "").any():
        axes.append("setting")
    return axes


def with_setting(tables: StudyTables) -> StudyTables:
    """The study restricted to trials whose optimiser is one of Miyato et al.'s settings A-F."""
    return replace(tables, trials=tables.trials[tables.trials["setting"] != ""])


def cell_axes(tables: StudyTables) -> list[str]:
    """The axes that define a cell: the swept axes without seed."""
    return [a for a in tables.axes if a != "seed" and a in tables.trials.columns]


def bootstrap_median_ci(
    values: np.ndarray, *, n_boot: int = N_BOOT, level: float = 0.95, seed: int = BOOT_SEED
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median: resample with replacement `n_boot` times from
    `np.random.default_rng(seed)`, take each resample's median, return its (1-level)/2 and (1+level)/2
    quantiles (numpy's default linear interpolation). NaN for no values; (v, v) for one."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    medians = np.median(values[rng.integers(0, values.size, size=(n_boot, values.size))], axis=1)
    low, high = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def cell_summary(
    tables: StudyTables, by: Sequence[str] | None = None, value: str = "final_metric"
) -> pd.DataFrame:
    """One row per cell (the `by` axes; default: every swept axis but seed) with SUMMARY_COLUMNS.

    `value` is the trials column to summarise (final_metric, final_is, final_kid, ...), lower is better for
    `best` except for IS columns.
    """
    by = list(cell_axes(tables) if by is None else by)
    missing = [a for a in by if a not in tables.trials]
    if missing:  # grouping by any trials column is allowed; callers check swept-ness with check_axes
        raise AxisError(
            f"axis {', '.join(map(repr, missing))} is not a trials column; valid axes: "
            f"{', '.join(available_axes(tables))}"
        )
    if value not in tables.trials:
        raise KeyError(f"value {value!r} is not a trials column; e.g. final_metric, final_is, final_kid")
    best_col, higher = ("best_is", True) if value.endswith("_is") else ("best_metric", False)
    rows = []
    for key, group in tables.trials.groupby(by, sort=True, dropna=False) if by else [((), tables.trials)]:
        key = key if isinstance(key, tuple) else (key,)
        complete = group[group["complete"]]
        kept = complete.loc[~complete["diverged"], value].dropna().to_numpy(dtype=float)
        diverged = complete[complete["diverged"]]
        low, high = bootstrap_median_ci(kept)
        best = group[best_col].max() if higher else group[best_col].min()
        rows.append(
            {
                **dict(zip(by, key, strict=True)),
                "n_seeds": len(group),
                "n_complete": len(complete),
                "n_diverged": len(diverged),
                "n_running": int((group["status"] == "running").sum()),
                "n_failed": int((group["status"] == "failed").sum()),
                "divergence_rate": len(diverged) / len(complete) if len(complete) else np.nan,
                "all_diverged": bool(len(complete) and len(diverged) == len(complete)),
                "median": float(np.median(kept)) if kept.size else np.nan,
                "mean": float(kept.mean()) if kept.size else np.nan,
                "std": float(kept.std(ddof=1)) if kept.size > 1 else np.nan,
                "best": float(best),
                "median_divergence_step": float(diverged["divergence_step"].median())
                if len(diverged)
                else np.nan,
                "ci_low": low,
                "ci_high": high,
            }
        )
    return pd.DataFrame(rows, columns=by + list(SUMMARY_COLUMNS))


def isolate(
    summary: pd.DataFrame, axis: str, keep: Sequence[str] = ("variant",), higher_is_better: bool = False
) -> pd.DataFrame:
    """The isolation of `axis` (the tuning playbook's isolation plot): for each value of `axis` (and of each
    `keep` axis), the cell with the best median over every other axis of `summary` (the nuisance axes).

    Cells where every seed diverged never win; a value whose cells all diverged keeps one row with NaN median.
    Columns: the summary's, plus `n_cells` (cells compared).
    """
    for name in (axis, *keep):
        if name not in summary:
            raise AxisError(
                f"axis {name!r} is not a column of the summary; columns: "
                f"{', '.join(c for c in summary.columns if c not in SUMMARY_COLUMNS)}"
            )
    group_by = [axis, *[k for k in keep if k != axis]]
    ordered = summary.sort_values(
        ["median"], ascending=not higher_is_better, na_position="last", kind="stable"
    )
    best = ordered.groupby(group_by, sort=True, dropna=False).head(1)
    counts = summary.groupby(group_by, dropna=False).size().rename("n_cells").reset_index()
    return best.merge(counts, on=group_by).sort_values(group_by, ignore_index=True)


def paper_table(tables: StudyTables, columns: str | None = None, value: str = "final_metric") -> pd.DataFrame:
    """The paper-style table: rows are variants, columns are settings A-F (or `columns`), each cell
    "mean ± std" over the non-diverged seeds of every trial in it, with "(k/n diverged)" if some did."""
    trials = tables.trials
    if columns is None:
        columns = (
            "setting"
            if (trials["setting"] != "").any()
            else next((a for a in cell_axes(tables) if a != "variant"), None)
        )
    axes = ["variant"] + ([columns] if columns else [])
    if columns == "setting":
        tables = with_setting(tables)
    summary = cell_summary(tables, by=axes, value=value)

    def text(row: pd.Series) -> str:
        body = (
            "all diverged"
            if row["all_diverged"]
            else (
                "–"
                if np.isnan(row["mean"])
                else f"{row['mean']:.3g} ± {0.0 if np.isnan(row['std']) else row['std']:.2g}"
            )
        )
        if row["n_diverged"] and not row["all_diverged"]:
            body += f" ({row['n_diverged']}/{row['n_complete']} diverged)"
        return body

    summary["text"] = summary.apply(text, axis=1)
    if not columns:
        return summary.set_index("variant")[["text"]].rename(columns={"text": value})
    table = summary.pivot(index="variant", columns=columns, values="text").fillna("")
    table.columns.name = columns
    return table
