"""The study report: one self-contained HTML file (figures embedded as base64 PNG, no external URL) with the
tables and figures of a study, written next to its Parquet tables and figures, and logged to the study's
MLflow parent run under `analysis/`.

Layout of out_dir: report.html, tables/<table>.parquet, tables/<name>.csv (aggregates),
figures/<name>.png|svg.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from analysis.aggregate import cell_axes, cell_summary, isolate, paper_table, setting_table
from analysis.collect import Progress, StudyTables, collect
from analysis.figures import (
    choose_trials,
    curve_data,
    heatmap_data,
    plot_curves,
    plot_heatmaps,
    plot_traces,
    report_pairs,
    save,
)
from study.layout import REPORT_ARTIFACT_PATH

MAX_TRIAL_ROWS = 500  # trials listed in the HTML; every trial is in tables/trials.parquet

CELLS_NOTE = (
    "One row per cell of {value}. median, mean, std and the bootstrap 95% CI of the median: over the "
    "stable seeds. paper_mean and paper_std: over every complete run with a value, whatever its outcome (the "
    "paper's statistic). Outcome counts and rates beside them; running and failed trials are in neither."
)
PAPER_NOTE = (
    "Each entry: mean ± std (ddof 1) over every complete run of the cell, as the paper counts every run; a "
    "run that diverged enters with the value it reached ({which}). In brackets, when some run is not stable: "
    "the stable runs, their count and mean ± std. Rows: variant × c (and any other swept axis that separates "
    "cells); columns: the full optimiser setting (g_lr, d_lr, β1, β2, n_dis). Every cell appears once, none "
    "pooled; an empty entry is a combination the grid does not hold."
)
WHICH = {"best": "its best evaluation before it stopped", "final": "its last evaluation before it stopped"}
RANKING_NOTE = (
    "The best cell by rank_value: the median of {value} over the complete seeds, each seed that is not "
    "stable counted as the worst value, so that a cell with half or more of its seeds unstable never beats "
    "one with fewer; ties go to the higher stable rate, then the better stable-only median."
)

CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1150px; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ccc; padding-top: 12px; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #eef2f7; }
.warn { background: #fff3cd; border: 1px solid #e0c060; padding: 8px; }
.meta td { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 6px 0; }
"""


def build_report(
    study: str,
    tracking_uri: str,
    out_dir: Path,
    *,
    progress: Progress | None = None,
    log_to_mlflow: bool = True,
    run_id: str | None = None,
) -> Path:
    """Collect `study` (its latest parent run, or the parent `run_id`: two starts of one study run apart)
    from MLflow, write its Parquet tables, aggregates, figures and report.html under `out_dir`, log them all
    to the study's parent run (artifact path `analysis/`), return the HTML path."""
    say = progress or (lambda message: None)
    started = time.perf_counter()
    tables = collect(tracking_uri, study=None if run_id else study, run_id=run_id, progress=say)
    say(f"collected in {time.perf_counter() - started:.1f} s")
    path = write_report(tables, Path(out_dir), progress=say)
    if log_to_mlflow:
        log_report(tables, tracking_uri, Path(out_dir), progress=say)
    return path


def log_report(
    tables: StudyTables, tracking_uri: str, out_dir: Path, *, progress: Progress | None = None
) -> None:
    """Log every file under out_dir to the study's parent run, under `analysis/`."""
    parent_run_id = tables.meta["parent_run_id"]
    MlflowClient(tracking_uri).log_artifacts(parent_run_id, str(out_dir), REPORT_ARTIFACT_PATH)
    if progress:
        progress(f"logged {out_dir} to parent run {parent_run_id} under {REPORT_ARTIFACT_PATH}/")


def write_report(tables: StudyTables, out_dir: Path, *, progress: Progress | None = None) -> Path:
    """Write the tables, figures and report.html of `tables` under `out_dir`; return the HTML path."""
    say = progress or (lambda message: None)
    out_dir = Path(out_dir)
    tables.write_parquet(out_dir / "tables")
    metric = tables.meta["metric"]
    sections: list[str] = []

    summary = cell_summary(tables)
    summary.to_csv(out_dir / "tables" / "cells.csv", index=False)
    sections.append(_section(f"Cells: final {metric}", _note(CELLS_NOTE.format(value=f"the final {metric}"))
                             + _table(summary)))
    for value, label, kind in _paper_values(tables, metric):
        paper = paper_table(tables, value=value)
        paper.to_csv(out_dir / "tables" / f"paper_{value}.csv")
        sections.append(_section(f"Paper table: {label}, mean ± std over every complete run",
                                 _note(PAPER_NOTE.format(which=WHICH[kind])) + _table(paper, index=True)))
    settings = setting_table(tables, value="best_metric")
    if settings is not None:
        settings.to_csv(out_dir / "tables" / "paper_settings.csv")
        note = _note(PAPER_NOTE.format(which=WHICH["best"]))
        sections.append(_section(f"Miyato et al.'s settings A–F: best {metric} over training",
                                 note + _table(settings, index=True)))
    nuisance = [a for a in cell_axes(tables) if a != "variant"]
    if "variant" in cell_axes(tables) and nuisance:
        isolation = isolate(summary, "variant", keep=())
        isolation.to_csv(out_dir / "tables" / "isolation_variant.csv", index=False)
        sections.append(
            _section(f"Isolation of variant: its best cell over {', '.join(nuisance)}",
                     _note(RANKING_NOTE.format(value=f"the final {metric}")) + _table(isolation))
        )
    say("aggregates written")

    figures = out_dir / "figures"
    for x, y in report_pairs(tables):
        data = heatmap_data(tables, x, y)
        paths = save(plot_heatmaps(data, metric), figures, f"heatmap_{y}_x_{x}")
        sections.append(_section(f"Stability heatmap: {y} × {x}", _image(paths["png"])))
    curves = curve_data(tables, by="variant")
    if len(curves):
        paths = save(plot_curves(curves, metric=metric), figures, "curves_variant")
        sections.append(_section(f"{metric} over iterations", _image(paths["png"])))
    run_ids = choose_trials(tables)
    if run_ids and len(tables.diagnostics):
        paths = save(plot_traces(tables, run_ids), figures, "traces")
        sections.append(_section("σ and gradient-norm traces of chosen trials", _image(paths["png"])))
    say("figures written")

    if len(tables.events):
        counts = tables.events.groupby(["cause", "action"]).size().rename("events").reset_index()
        sections.append(_section("Divergence events", _table(counts)))
    shown = tables.trials[
        [
            "trial_id",
            "cell",
            *(["seed"] if "seed" in tables.trials else []),
            "status",
            "divergence_cause",
            "divergence_step",
            "final_metric",
            "best_metric",
            "last_iteration",
            "wall_time_s",
        ]
    ]
    note = f" (first {MAX_TRIAL_ROWS} of {len(shown)})" if len(shown) > MAX_TRIAL_ROWS else ""
    sections.append(_section(f"Trials{note}", _table(shown.head(MAX_TRIAL_ROWS))))

    path = out_dir / "report.html"
    path.write_text(_page(tables, sections), encoding="utf-8")
    say(f"report written: {path}")
    return path


def _page(tables: StudyTables, sections: list[str]) -> str:
    meta, trials = tables.meta, tables.trials
    counts = trials["status"].value_counts().to_dict()
    warnings = []
    if meta["study_status"] != "finished":
        warnings.append(f"The study is {meta['study_status']}: results are partial.")
    for status in ("running", "failed"):
        if counts.get(status):
            warnings.append(
                f"{counts[status]} trial(s) {status}: left out of the metric statistics and the "
                f"divergence rates."
            )
    rows = {
        "study": meta["study"],
        "status": meta["study_status"],
        "parent run": meta["parent_run_id"],
        "tracking URI": meta["tracking_uri"],
        "swept axes": meta["axes"],
        "metric": meta["metric"],
        "trials": ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        "collected at": meta["collected_at"],
    }
    if meta.get("skipped_runs"):  # empty runs (no params): named, not analysed
        rows["empty runs skipped"] = meta["skipped_runs"].replace(",", ", ")
    head = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items()
    )
    warn = "".join(f'<p class="warn">{html.escape(w)}</p>' for w in warnings)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Study {html.escape(meta['study'])}"
        f"</title><style>{CSS}</style></head><body><h1>GAN stability study: {html.escape(meta['study'])}"
        f"</h1>{warn}<table class='meta'>{head}</table>{''.join(sections)}</body></html>"
    )


def _paper_values(tables: StudyTables, metric: str) -> list[tuple[str, str, str]]:
    """(trials column, label, best or final) of each paper table: the primary metric's best over training and
    final value, then IS's when the study measured it (the paper reports both FID and IS)."""
    values = [("best_metric", f"best {metric} over training", "best"),
              ("final_metric", f"final {metric}", "final")]
    if tables.trials["final_is"].notna().any():
        values += [("best_is", "best IS over training", "best"), ("final_is", "final IS", "final")]
    return values


def _section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2>{body}"


def _note(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _table(frame: pd.DataFrame, index: bool = False) -> str:
    return frame.to_html(index=index, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0, escape=True)


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
