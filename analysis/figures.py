"""The study's figures: stability heatmaps, metric curves with seed bands, sigma and gradient-norm traces.

Each figure has a `*_data` function that returns exactly the numbers drawn, so tests compare the drawing with
the data behind it. Figures use the Agg backend and are saved as PNG and SVG by `save`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from analysis.aggregate import (  # noqa: E402
    SUMMARY_COLUMNS,
    available_axes,
    cell_summary,
    check_axes,
    isolate,
    with_setting,
)
from analysis.collect import StudyTables  # noqa: E402

CMAP = "viridis_r"  # lower metric (better) is brighter
# A cell without a stable seed has no median to colour it: it is painted with its most common outcome.
OUTCOME_STYLE = {  # outcome -> (face colour, hatch)
    "diverged": ("#b0b0b0", "xx"),
    "collapsed": ("#f2b880", "//"),
    "no_learning": ("#cfc6e8", ".."),
}
UNSTABLE_OUTCOMES = tuple(OUTCOME_STYLE)  # the complete outcomes other than stable, in label order
# Axis pairs the report draws when the study swept both (the list, in order).
REPORT_PAIRS = (
    ("g_lr", "beta1"),
    ("beta1", "beta2"),
    ("g_lr", "n_dis"),
    ("scale", "variant"),
    ("setting", "variant"),
)


@dataclass
class HeatmapData:
    """What a stability heatmap draws: per panel, pivot tables with rows = y values and columns = x values."""

    x: str
    y: str
    panel: str | None  # the axis with one panel per value, None for one panel
    median: dict[str, pd.DataFrame]  # median final metric (NaN: no stable seed or no such cell)
    n_stable: dict[str, pd.DataFrame]
    n_complete: dict[str, pd.DataFrame]
    unstable: dict[str, pd.DataFrame]  # a cell without a stable seed: its most common outcome, else ''
    labels: dict[str, pd.DataFrame]  # the annotation text of each cell ('' for no such cell)
    vmin: float  # the shared colour scale
    vmax: float


def cell_label(median: float, outcomes: Mapping[str, int], n_running: int = 0) -> str:
    """The annotation of one heatmap cell: the median over its stable seeds, "3/5 stable" over its complete
    seeds, then a line per other outcome ("2 diverged"). outcomes: count per outcome (stable, diverged,
    collapsed, no_learning; others ignored)."""
    n_stable = outcomes.get("stable", 0)
    n_complete = n_stable + sum(outcomes.get(name, 0) for name in UNSTABLE_OUTCOMES)
    if n_complete == 0:
        return f"{n_running} running" if n_running else "no result"
    lines = [f"{median:.3g}"] if n_stable else []
    lines.append(f"{n_stable}/{n_complete} stable")
    lines += [f"{outcomes[name]} {name}" for name in UNSTABLE_OUTCOMES if outcomes.get(name)]
    return "\n".join(lines)


def unstable_outcome(outcomes: Mapping[str, int]) -> str:
    """The outcome that paints a cell without a stable seed: its most common (ties: UNSTABLE_OUTCOMES order);
    '' for a cell with a stable seed or without a complete one."""
    if outcomes.get("stable", 0):
        return ""
    counts = [(outcomes.get(name, 0), -rank, name) for rank, name in enumerate(UNSTABLE_OUTCOMES)]
    count, _, name = max(counts)
    return name if count else ""


def heatmap_data(
    tables: StudyTables, x: str, y: str, panel: str | None = "variant", value: str = "final_metric"
) -> HeatmapData:
    """Pivot the cell summary over (y, x), one panel per value of `panel` (None, x or y: one)."""
    check_axes(tables, [x, y])
    if x == y:
        raise ValueError(f"x and y must be two different axes, got {x!r} twice")
    if panel in (x, y) or (panel is not None and panel not in available_axes(tables)):
        panel = None
    by = [x, y] + ([panel] if panel else [])
    summary = cell_summary(with_setting(tables) if "setting" in by else tables, by=by, value=value)
    outcomes = [{name: int(row[f"n_{name}"]) for name in ("stable", *UNSTABLE_OUTCOMES)}
                for _, row in summary.iterrows()]
    summary["label"] = [cell_label(median, counts, running) for median, counts, running
                        in zip(summary["median"], outcomes, summary["n_running"], strict=True)]
    summary["unstable"] = [unstable_outcome(counts) for counts in outcomes]
    x_values, y_values = sorted(summary[x].unique()), sorted(summary[y].unique())
    groups = summary.groupby(panel, sort=True) if panel else [("all", summary)]
    out: dict[str, dict[str, pd.DataFrame]] = {
        k: {} for k in ("median", "n_stable", "n_complete", "unstable", "labels")
    }
    for name, group in groups:
        name = name[0] if isinstance(name, tuple) else name

        def pivot(column: str, fill: object, group: pd.DataFrame = group) -> pd.DataFrame:
            table = group.pivot(index=y, columns=x, values=column).reindex(index=y_values, columns=x_values)
            return table.fillna(fill).infer_objects() if fill is not None else table.astype(float)

        out["median"][str(name)] = pivot("median", None)
        out["n_stable"][str(name)] = pivot("n_stable", 0).astype(int)
        out["n_complete"][str(name)] = pivot("n_complete", 0).astype(int)
        out["unstable"][str(name)] = pivot("unstable", "")
        out["labels"][str(name)] = pivot("label", "")
    medians = summary["median"].dropna()
    vmin, vmax = (float(medians.min()), float(medians.max())) if len(medians) else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    return HeatmapData(x=x, y=y, panel=panel, vmin=vmin, vmax=vmax, **out)


def plot_heatmaps(data: HeatmapData, metric: str = "metric") -> Figure:
    """One panel per value of data.panel on one shared colour scale of the stable seeds' medians; every cell
    annotated with its stable count and other outcomes; a cell without a stable seed painted and hatched as
    its most common outcome (OUTCOME_STYLE), with a legend of those drawn."""
    names = list(data.median)
    ny, nx = next(iter(data.median.values())).shape
    fig, axes = plt.subplots(
        1,
        len(names),
        figsize=(1.2 + (1.1 * nx + 0.9) * len(names), 1.2 + 0.75 * ny + 0.6),
        squeeze=False,
        layout="constrained",
    )
    norm, cmap = Normalize(vmin=data.vmin, vmax=data.vmax), plt.get_cmap(CMAP)
    drawn: dict[str, Rectangle] = {}
    for ax, name in zip(axes[0], names, strict=True):
        median = data.median[name]
        sns.heatmap(
            median,
            ax=ax,
            cmap=cmap,
            norm=norm,
            cbar=False,
            linewidths=0.5,
            linecolor="white",
            xticklabels=[_fmt(v) for v in median.columns],
            yticklabels=[_fmt(v) for v in median.index],
            mask=median.isna(),
        )
        for (i, j), label in np.ndenumerate(data.labels[name].to_numpy()):
            if not label:
                continue
            outcome = data.unstable[name].iat[i, j]
            if outcome:
                color, hatch = OUTCOME_STYLE[outcome]
                drawn[outcome] = ax.add_patch(
                    Rectangle((j, i), 1, 1, facecolor=color, hatch=hatch, edgecolor="white", linewidth=0.5,
                              label=f"no stable seed: mostly {outcome}")
                )
            value = median.iat[i, j]
            color = "black" if np.isnan(value) or _luminance(cmap(norm(value))) > 0.45 else "white"
            ax.text(j + 0.5, i + 0.5, label, ha="center", va="center", fontsize=7, color=color)
        ax.set_title(f"{data.panel} = {name}" if data.panel else "")
        ax.set_xlabel(data.x)
        ax.set_ylabel(data.y)
    fig.colorbar(
        plt.cm.ScalarMappable(norm=norm, cmap=cmap),
        ax=list(axes[0]),
        label=f"median final {metric} (stable seeds)",
    )
    if drawn:
        fig.legend(handles=[drawn[o] for o in UNSTABLE_OUTCOMES if o in drawn], loc="outside lower center",
                   ncols=len(drawn), fontsize=7, frameon=False)
    fig.suptitle(f"Stability: {data.y} × {data.x}")
    return fig


def curve_data(tables: StudyTables, by: str = "variant", value: str = "metric") -> pd.DataFrame:
    """Metric over iterations of the best cell of each `by` value (isolation over the other axes): per
    iteration, the median, min and max over that cell's complete (finished or diverged) seeds.
    Columns: by, cell, iteration, median, low,
    high, n_seeds."""
    trials, evals = tables.trials, tables.evals
    if by not in trials:
        raise ValueError(f"by must be a trials column such as variant, got {by!r}")
    summary = cell_summary(
        tables, by=sorted({*[a for a in available_axes(tables) if a not in ("seed", "setting")], by})
    )
    best = isolate(summary, by, keep=())
    rows = []
    for cell in best.itertuples(index=False):
        match = np.ones(len(trials), dtype=bool)
        for axis in [c for c in summary.columns if c not in SUMMARY_COLUMNS]:
            match &= (trials[axis] == getattr(cell, axis)).to_numpy()
        run_ids = trials.loc[match & trials["complete"].to_numpy(), "run_id"]
        points = evals[evals["run_id"].isin(run_ids)].dropna(subset=[value])
        stats = points.groupby("iteration")[value].agg(["median", "min", "max", "count"]).reset_index()
        key = trials.loc[match, "cell"].iat[0] if match.any() else ""
        for s in stats.itertuples(index=False):
            rows.append(
                {
                    by: getattr(cell, by),
                    "cell": key,
                    "iteration": s.iteration,
                    "median": s.median,
                    "low": s.min,
                    "high": s.max,
                    "n_seeds": s.count,
                }
            )
    return pd.DataFrame(rows, columns=[by, "cell", "iteration", "median", "low", "high", "n_seeds"])


def plot_curves(curves: pd.DataFrame, by: str = "variant", metric: str = "metric") -> Figure:
    """Median metric over iterations per `by` value, with a band from the min to the max seed."""
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for name, group in curves.groupby(by, sort=True):
        (line,) = ax.plot(
            group["iteration"],
            group["median"],
            marker="o",
            markersize=2,
            label=f"{name} ({group['cell'].iat[0]})",
        )
        ax.fill_between(group["iteration"], group["low"], group["high"], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("generator iteration")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} over training: best cell per {by}, median and min–max over seeds")
    ax.legend(fontsize=7)
    return fig


def choose_trials(tables: StudyTables, k: int = 4) -> list[str]:
    """Trials worth a trace: the earliest divergences (at most half of k), then the median seed of each
    variant's best cell. Returns at most k run ids."""
    trials = tables.trials
    diverged = trials[trials["diverged"]].sort_values("divergence_step")
    chosen = diverged["run_id"].head(k // 2).tolist()
    fine = trials[trials["complete"] & ~trials["diverged"] & trials["final_metric"].notna()]
    for _, group in fine.groupby("variant", sort=True):
        best_cell = group.groupby("cell")["final_metric"].median().idxmin()
        seeds = group[group["cell"] == best_cell].sort_values("final_metric")
        chosen.append(seeds["run_id"].iat[(len(seeds) - 1) // 2])
    return list(dict.fromkeys(chosen))[:k]


def trace_data(
    tables: StudyTables, run_ids: Sequence[str], quantities: Sequence[str] = ("sigma", "grad_norm")
) -> pd.DataFrame:
    """The diagnostics rows drawn by plot_traces: the given trials and quantities (grad_norm: D layers)."""
    diag = tables.diagnostics
    rows = diag[diag["run_id"].isin(run_ids) & diag["quantity"].isin(quantities)]
    return rows[(rows["quantity"] != "grad_norm") | (rows["network"] == "D")]


def plot_traces(
    tables: StudyTables, run_ids: Sequence[str], quantities: Sequence[str] = ("sigma", "grad_norm")
) -> Figure:
    """One column per trial, one row per quantity; a line per layer (grad_norm: D's layers and total)."""
    data = trace_data(tables, run_ids, quantities)
    info = tables.trials.set_index("run_id")
    fig, axes = plt.subplots(
        len(quantities),
        max(len(run_ids), 1),
        figsize=(3.6 * max(len(run_ids), 1), 2.6 * len(quantities)),
        squeeze=False,
        layout="constrained",
    )
    for col, run_id in enumerate(run_ids):
        trial = info.loc[run_id]
        title = f"{trial['cell']} seed {trial.get('seed', '')}"
        if trial["diverged"]:
            title += f"\ndiverged: {trial['divergence_cause']} @ {trial['divergence_step']}"
        for row, quantity in enumerate(quantities):
            ax = axes[row][col]
            part = data[(data["run_id"] == run_id) & (data["quantity"] == quantity)]
            for layer, lines in part.groupby("layer", sort=True):
                ax.plot(lines["iteration"], lines["value"], linewidth=1, label=layer or "total")
            if trial["diverged"]:
                ax.axvline(trial["divergence_step"], color="red", linestyle="--", linewidth=1)
            if quantity.startswith("grad") and (part["value"] > 0).all() and len(part):
                ax.set_yscale("log")
            ax.set_title(title if row == 0 else "", fontsize=8)
            ax.set_ylabel(quantity if col == 0 else "")
            ax.set_xlabel("generator iteration" if row == len(quantities) - 1 else "")
            if len(part):
                ax.legend(fontsize=6)
    return fig


def plot_layer_trends(trends: pd.DataFrame, *, ylabel: str, title: str, reference: float | None = None,
                      ncols: int = 4) -> Figure:
    """One panel per variant, a line per layer: the median over trials of a quantity (analysis.theory's
    TREND_COLUMNS) against the iteration, its quartiles as a band; log scale; `reference` a dashed line (the
    prediction)."""
    variants = sorted(trends["variant"].unique()) or ["(none)"]
    ncols = min(ncols, len(variants))
    nrows = -(-len(variants) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.7 * nrows), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, variant in zip(axes.flat, variants, strict=False):
        for layer, lines in trends[trends["variant"] == variant].groupby("layer", sort=True):
            (line,) = ax.plot(lines["iteration"], lines["median"], linewidth=1, marker=".", markersize=3,
                              label=layer)
            ax.fill_between(lines["iteration"], lines["low"], lines["high"], color=line.get_color(),
                            alpha=0.15)
        if reference is not None:
            ax.axhline(reference, color="black", linestyle="--", linewidth=0.8)
        if (trends["median"] > 0).all() and len(trends):
            ax.set_yscale("log")
        ax.set_title(str(variant), fontsize=9)
        ax.set_xlabel("generator iteration", fontsize=8)
        ax.legend(fontsize=5)
    for ax in list(axes.flat)[len(variants):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    return fig


def save(fig: Figure, out_dir: str | Path, name: str) -> dict[str, Path]:
    """Save as <out_dir>/<name>.png (120 dpi) and .svg, close the figure, return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"png": out_dir / f"{name}.png", "svg": out_dir / f"{name}.svg"}
    fig.savefig(paths["png"], dpi=120)
    fig.savefig(paths["svg"])
    plt.close(fig)
    return paths


def report_pairs(tables: StudyTables) -> list[tuple[str, str]]:
    """The heatmap axis pairs (x, y) a report draws: REPORT_PAIRS the study swept, else its first two axes."""
    axes = available_axes(tables)
    pairs = [(x, y) for x, y in REPORT_PAIRS if x in axes and y in axes]
    others = [a for a in axes if a not in ("seed", "variant", "setting")]
    fallback = (
        [(others[0], others[1])]
        if len(others) >= 2
        else ([(others[0], "variant")] if others and "variant" in axes else [])
    )
    if all("setting" in pair for pair in pairs):  # the derived axis alone hides the swept ones
        pairs += [p for p in fallback if p not in pairs]
    return pairs


def _fmt(value: object) -> str:
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)


def _luminance(rgba: tuple[float, ...]) -> float:
    r, g, b = rgba[:3]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b
