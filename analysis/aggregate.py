"""Per-cell aggregates over seeds, bootstrap intervals, the best-cell ranking and the paper's tables.

A cell is one point of the swept grid: every swept axis but `seed`. Each trial has an outcome
(`trial_outcomes`, the one place outcomes are read): stable, diverged, collapsed, no_learning, failed, or
running (none yet). The complete trials are those with a result: every outcome but failed and running. Each
cell carries two kinds of statistics of a value column (final_metric, best_metric, final_is, best_is, ...):

- stable-only: median / mean / std and the bootstrap interval over the cell's stable seeds (what a stable run
  of the cell reaches), beside the outcome counts and rates;
- the paper's: mean ± std over every complete run with a value, whatever its outcome, as the paper counts
  every run (the official code never stops one). A diverged run enters with the value it reached: its best
  over training, or its final value, the last evaluation before it stopped. A paper preset stops a run only
  on a non-finite loss or gradient, so there almost every run is complete to its last iteration.

The best-cell ranking (`isolate`, the curves' best cell) orders cells by `rank_value`: the median over the
complete seeds where each seed that is not stable counts as the worst possible value (+inf for FID, -inf for
IS). A cell with half or more of its complete seeds unstable thus ranks below every cell with fewer, and each
unstable seed pushes its cell's median towards its worse survivors. Ties (such as two cells both half or more
unstable) go to the higher stable rate, then to the better stable-only median.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from analysis.collect import StudyTables
from study import layout

N_BOOT = 10_000  # bootstrap resamples
BOOT_SEED = 0  # every cell is resampled from this seed, so its interval does not depend on the other cells
OUTCOMES = layout.OUTCOMES  # stable, diverged, collapsed, no_learning, failed
COMPLETE_OUTCOMES = tuple(name for name in OUTCOMES if name != layout.FAILED)  # failed: a crash, no result
OPTIMISER = ("g_lr", "d_lr", "beta1", "beta2", "n_dis")  # the full optimiser setting of a paper-table column

SUMMARY_COLUMNS = {
    "n_seeds": "trials in the cell (all outcomes, running included)",
    "n_complete": "trials with a result: stable, diverged, collapsed or no_learning",
    "n_stable": "complete trials that are stable",
    "n_diverged": "trials that diverged",
    "n_collapsed": "trials that collapsed",
    "n_no_learning": "trials that did not learn",
    "n_running": "trials still running",
    "n_failed": "trials that failed (crashed, not diverged)",
    "stable_rate": "n_stable / n_complete (NaN when none complete)",
    "divergence_rate": "n_diverged / n_complete (NaN when none complete)",
    "all_diverged": "every complete seed diverged",
    "median": "median of the value over the stable seeds",
    "mean": "mean of the same",
    "std": "sample standard deviation (ddof=1) of the same, NaN below 2 seeds",
    "n_paper": "complete trials with a value: the runs of the paper's statistics",
    "paper_mean": "mean of the value over every complete trial with one, whatever its outcome (the paper's)",
    "paper_std": "sample standard deviation (ddof=1) of the same, NaN below 2 runs",
    "rank_value": "median over the complete seeds, each seed not stable as the worst value: the ranking key",
    "best": "the best best-over-training value over the cell's trials (lowest; highest for IS)",
    "median_divergence_step": "median iteration of divergence over diverged seeds",
    "ci_low": "2.5% bound of the bootstrap 95% interval of the stable-only median",
    "ci_high": "97.5% bound of the same",
}


class AxisError(ValueError):
    """An axis the study did not sweep."""


def trial_outcomes(trials: pd.DataFrame) -> pd.Series:
    """The outcome of each trial: one of OUTCOMES, or "running" while it has none.

    The `outcome` column (analysis.collect writes it from each run's tags, study.layout.outcome); a table
    without one (Parquet collected before the column existed) by the same function from `status`,
    `diverged` and, where there, `mlflow_status`.
    """
    if "outcome" in trials:
        return trials["outcome"].astype(object)
    mlflow_status = trials["mlflow_status"] if "mlflow_status" in trials else ["FINISHED"] * len(trials)
    outcome = [layout.outcome({layout.STATUS_TAG: status, layout.DIVERGED_TAG: str(int(diverged))}, state)
               for status, diverged, state in zip(trials["status"], trials["diverged"], mlflow_status,
                                                 strict=True)]
    return pd.Series(outcome, index=trials.index, dtype=object)


def higher_is_better(value: str) -> bool:
    """IS columns (final_is, best_is) grow with quality; FID, KID and the digits distance shrink."""
    return value.endswith("_is")


def check_axes(tables: StudyTables, axes: Sequence[str]) -> None:
    """Raise AxisError naming each axis that is neither swept by the study nor derived (`setting`)."""
    valid = available_axes(tables)
    unknown = [a for a in axes if a not in valid]
    if unknown:
        raise AxisError(
            f"axis {', '.join(map(repr, unknown))} was not swept by study {tables.meta['study']!r}; "
            f"valid axes: {', '.join(valid) if valid else 'none'}"
        )


def swept_settings(tables: StudyTables) -> bool:
    """Whether the study swept Miyato et al.'s settings: its trials hold at least two optimiser settings
    (g_lr, d_lr, beta1, beta2, n_dis) and every one of them is one of A-F. A study that meets a setting by
    chance (one cell of a learning-rate grid is setting C) did not sweep them."""
    trials = tables.trials
    if not len(trials) or (trials["setting"] == "").any() or not all(c in trials for c in OPTIMISER):
        return False
    return len(trials.drop_duplicates(list(OPTIMISER))) >= 2


def available_axes(tables: StudyTables) -> list[str]:
    """Swept axes with a column in `trials`, plus `setting` when the study swept Miyato et al.'s A-F."""
    axes = [a for a in tables.axes if a in tables.trials.columns]
    if swept_settings(tables):
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
    """One row per cell (the `by` axes; default: every swept axis but seed) with SUMMARY_COLUMNS, of the
    trials column `value` (final_metric, best_metric, final_is, best_is, ...; IS: higher is better)."""
    by = list(cell_axes(tables) if by is None else by)
    missing = [a for a in by if a not in tables.trials]
    if missing:  # grouping by any trials column is allowed; callers check swept-ness with check_axes
        raise AxisError(
            f"axis {', '.join(map(repr, missing))} is not a trials column; valid axes: "
            f"{', '.join(available_axes(tables))}"
        )
    if value not in tables.trials:
        raise KeyError(f"value {value!r} is not a trials column; e.g. final_metric, final_is, final_kid")
    higher = higher_is_better(value)
    best_col = "best_is" if higher else "best_metric"
    worst = -np.inf if higher else np.inf
    trials = tables.trials.assign(_outcome=trial_outcomes(tables.trials))
    rows = []
    for key, group in trials.groupby(by, sort=True, dropna=False) if by else [((), trials)]:
        key = key if isinstance(key, tuple) else (key,)
        outcome = group["_outcome"]
        complete = group[outcome.isin(COMPLETE_OUTCOMES)]
        stable = complete["_outcome"] == "stable"
        kept = complete.loc[stable, value].dropna().to_numpy(dtype=float)
        paper = complete[value].dropna().to_numpy(dtype=float)
        ranked = complete[value].where(stable, worst).fillna(worst).to_numpy(dtype=float)
        diverged = complete[complete["_outcome"] == "diverged"]
        counts = {name: int((outcome == name).sum()) for name in (*OUTCOMES, "running")}
        low, high = bootstrap_median_ci(kept)
        best = group[best_col].max() if higher else group[best_col].min()
        rows.append(
            {
                **dict(zip(by, key, strict=True)),
                "n_seeds": len(group),
                "n_complete": len(complete),
                "n_stable": counts["stable"],
                "n_diverged": counts["diverged"],
                "n_collapsed": counts["collapsed"],
                "n_no_learning": counts["no_learning"],
                "n_running": counts["running"],
                "n_failed": counts["failed"],
                "stable_rate": counts["stable"] / len(complete) if len(complete) else np.nan,
                "divergence_rate": counts["diverged"] / len(complete) if len(complete) else np.nan,
                "all_diverged": bool(len(complete) and counts["diverged"] == len(complete)),
                "median": float(np.median(kept)) if kept.size else np.nan,
                "mean": float(kept.mean()) if kept.size else np.nan,
                "std": float(kept.std(ddof=1)) if kept.size > 1 else np.nan,
                "n_paper": paper.size,
                "paper_mean": float(paper.mean()) if paper.size else np.nan,
                "paper_std": float(paper.std(ddof=1)) if paper.size > 1 else np.nan,
                "rank_value": float(np.median(ranked)) if ranked.size else np.nan,
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
    `keep` axis), the best cell over every other axis of `summary` (the nuisance axes), by the module's
    ranking rule: `rank_value`, then `stable_rate`, then the stable-only median. A cell with half or more of
    its seeds unstable never beats one with fewer; a value whose cells have no complete seed keeps one row
    with NaNs. Columns: the summary's, plus `n_cells` (cells compared).
    """
    for name in (axis, *keep):
        if name not in summary:
            raise AxisError(
                f"axis {name!r} is not a column of the summary; columns: "
                f"{', '.join(c for c in summary.columns if c not in SUMMARY_COLUMNS)}"
            )
    group_by = [axis, *[k for k in keep if k != axis]]
    ordered = summary.sort_values(
        ["rank_value", "stable_rate", "median"],
        ascending=[not higher_is_better, False, not higher_is_better], na_position="last", kind="stable",
    )
    best = ordered.groupby(group_by, sort=True, dropna=False).head(1)
    counts = summary.groupby(group_by, dropna=False).size().rename("n_cells").reset_index()
    return best.merge(counts, on=group_by).sort_values(group_by, ignore_index=True)


def paper_keys(tables: StudyTables) -> tuple[list[str], list[str]]:
    """(row keys, column keys) of the paper tables: rows variant and scale (the constant c), plus each other
    swept axis that separates cells within them, so that no two cells are pooled; columns the full optimiser
    setting (g_lr, d_lr, beta1, beta2, n_dis)."""
    trials = tables.trials
    rows = [c for c in ("variant", "scale") if c in trials]
    columns = [c for c in OPTIMISER if c in trials]
    base = rows + columns
    grouped = trials.groupby(base, dropna=False) if base else None
    extra = [a for a in cell_axes(tables) if a not in base
             and (grouped is None or (grouped[a].nunique(dropna=False) > 1).any())]
    return rows + extra, columns


def paper_cells(tables: StudyTables, value: str = "best_metric") -> pd.DataFrame:
    """cell_summary keyed as the paper's tables (paper_keys): one row per cell, none pooled, none dropped."""
    rows, columns = paper_keys(tables)
    return cell_summary(tables, by=rows + columns, value=value)


def paper_text(row: pd.Series) -> str:
    """One paper-table entry: the paper's mean ± std over every complete run, then, when some complete run
    is not stable, the stable-only mean ± std with the stable count, then runs without a result yet."""
    parts = []
    if row["n_paper"]:
        std = "" if np.isnan(row["paper_std"]) else f" ± {row['paper_std']:.2g}"
        parts.append(f"{row['paper_mean']:.3g}{std}")
        if row["n_paper"] < row["n_complete"]:
            parts.append(f"(n={row['n_paper']} of {row['n_complete']})")
    if row["n_complete"] and row["n_stable"] < row["n_complete"]:
        stable = f"stable {row['n_stable']}/{row['n_complete']}"
        if row["n_stable"] and not np.isnan(row["mean"]):
            std = "" if np.isnan(row["std"]) else f" ± {row['std']:.2g}"
            stable += f": {row['mean']:.3g}{std}"
        parts.append(f"[{stable}]")
    for name in ("running", "failed"):
        if row[f"n_{name}"]:
            parts.append(f"({row[f'n_{name}']} {name})")
    return " ".join(parts) or "–"


def paper_table(tables: StudyTables, value: str = "best_metric") -> pd.DataFrame:
    """The paper-style table of `value`: rows variant × c (× any other axis that separates cells), columns the
    full optimiser setting (g_lr, d_lr, beta1, beta2, n_dis), each entry `paper_text` of its cell; '' where
    the grid has no such cell. Every cell of the study appears once."""
    rows, columns = paper_keys(tables)
    cells = paper_cells(tables, value)
    cells["text"] = cells.apply(paper_text, axis=1)
    if not columns:
        return cells.set_index(rows)[["text"]].rename(columns={"text": value})
    table = cells.pivot_table(index=rows or None, columns=columns, values="text", aggfunc="first",
                              dropna=False, sort=True)
    return table.dropna(how="all").dropna(axis=1, how="all").fillna("")


def setting_table(tables: StudyTables, value: str = "best_metric") -> pd.DataFrame | None:
    """The paper table with Miyato et al.'s setting letters A-F as its columns, when the study swept them
    (swept_settings); None otherwise."""
    if not swept_settings(tables):
        return None
    rows, _ = paper_keys(tables)
    cells = cell_summary(tables, by=rows + ["setting"], value=value)
    cells["text"] = cells.apply(paper_text, axis=1)
    return cells.pivot_table(index=rows or None, columns="setting", values="text", aggfunc="first",
                             sort=True).fillna("")


def extreme_seeds(tables: StudyTables, value: str = "final_metric") -> pd.DataFrame:
    """Each cell's best and worst trial, the seeds whose sample grids a reviewer looks at first.

    Ranked as `rank_value` ranks: stable trials before the others, then by `value` (lower is better; IS
    higher), a missing value last; running and failed trials only where a cell has nothing else. Columns: the
    cell axes, cell, which ("best" or "worst"; a one-trial cell has only "best"), run_id, seed, outcome,
    value. One row per (cell, which), cells in cell_summary's order."""
    axes = cell_axes(tables)
    trials = tables.trials.assign(outcome=trial_outcomes(tables.trials))
    sign = -1.0 if higher_is_better(value) else 1.0
    trials = trials.assign(_unstable=trials["outcome"] != "stable",
                           _value=(sign * trials[value]).fillna(np.inf))
    rows = []
    for _, group in trials.groupby(axes, sort=True, dropna=False) if axes else [((), trials)]:
        complete = group[group["outcome"].isin(COMPLETE_OUTCOMES)]
        pool = complete if len(complete) else group
        ranked = pool.sort_values(["_unstable", "_value", "seed" if "seed" in pool else "run_id"])
        chosen = [("best", ranked.iloc[0])] + ([("worst", ranked.iloc[-1])] if len(ranked) > 1 else [])
        for which, trial in chosen:
            rows.append({**{a: trial[a] for a in axes}, "cell": trial["cell"], "which": which,
                         "run_id": trial["run_id"], "seed": trial.get("seed", np.nan),
                         "outcome": trial["outcome"], "value": trial[value]})
    return pd.DataFrame(rows, columns=[*axes, "cell", "which", "run_id", "seed", "outcome", "value"])
