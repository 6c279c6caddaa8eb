"""The study report: one self-contained HTML file (figures embedded as base64 PNG, no external URL) with the
tables and figures of a study, written next to its Parquet tables and figures, and logged to the study's
MLflow parent run under `analysis/`.

Layout of out_dir (by default reports/<study>/, whichever command writes it): report.html,
tables/<table>.parquet, tables/<name>.csv (aggregates), figures/<name>.png|svg, samples/<run_id>/<grid>.png
(each cell's best and worst seed's last sample grid).
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from analysis.aggregate import (
    cell_axes,
    cell_summary,
    extreme_seeds,
    isolate,
    paper_table,
    setting_table,
)
from analysis.collect import Progress, StudyTables, collect, fetch_sample_grids
from analysis.figures import (
    choose_trials,
    curve_data,
    heatmap_data,
    plot_curves,
    plot_heatmaps,
    plot_layer_trends,
    plot_traces,
    report_pairs,
    save,
)
from analysis.theory import (
    CONV_RATIO,
    GRAD_NORM,
    STD_RATIO,
    conv_ratio_trends,
    gradient_trends,
    std_ratio_trends,
    theory_table,
)
from study.layout import REPORT_ARTIFACT_PATH
from trainables.config import DIVERGENCE_CAUSES, SURROGATE_METRICS

SAMPLES_FOLDER = "samples"  # out_dir/samples/<run_id>/: the trials' sample grids the report shows
REPORTS = Path("reports")  # where a study's report goes by default, however it is written: reports/<study>/
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
THEORY_NOTE = (
    "What the paper (Lin, Sekar, Fanti 2021) predicts, beside what every trial measured on its D at each "
    "logging step. A matrix of m × n i.i.d. entries of std s has σ ≈ s(√m + √n), so SN's W/σ has entries of "
    "std 1/(√fan_in + √fan_out) with fan_out = c_out and fan_in = c_in·k·k, the (c_out, c_in·k·k) reshape SN "
    "divides by: close to LeCun's 1/√fan_in, and held there throughout training. BSN divides by the mean of "
    "both reshapes' σ: 2/(√c_out + √(c_in·k·k) + √c_in + √(c_out·k·k)), symmetric in c_in and c_out "
    "(Xavier-like); SSN and BSSN multiply it by c (c as Kaiming's gain), the learned-γ variants by γ. "
    "Strict SN and the variants that are no SN are held to SN's value for their shape. std / prediction: "
    "the measured std of the effective weight over that prediction (1: the theory holds). σ_conv / σ: the "
    "convolution operator's σ over the reshape's, of the raw weight (> 1: dividing by σ_conv, strict SN "
    "over-shrinks the weights, std / prediction ≈ σ / σ_conv, and its gradients vanish). Table values: "
    "medians over the trials and D layers at each trial's first and last logged step (conv layers only for "
    "σ_conv / σ, at the last evaluation); figures: the median over a variant's trials per layer, quartiles "
    "shaded."
)
GRIDS_NOTE = (
    "Each cell's best and worst seed (stable seeds first, then by the final {metric}; a seed that diverged "
    "or failed ranks last), the sample grid of its last evaluation. Below each grid: the seed, its outcome, "
    "its final {metric} and the iteration of the grid."
)
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
table.grids td { text-align: center; vertical-align: top; font-size: 11px; }
table.grids img { width: 220px; image-rendering: pixelated; }
"""


def report_folder(study: str) -> Path:
    """The default output folder of a study's report, relative to the working folder: reports/<study>."""
    return REPORTS / study


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
    """Log every file under out_dir to the study's parent run, under `analysis/`, but the sample grids: they
    are the trial runs' own artifacts (and embedded in report.html)."""
    parent_run_id = tables.meta["parent_run_id"]
    client = MlflowClient(tracking_uri)
    for entry in sorted(Path(out_dir).iterdir()):
        if entry.is_dir() and entry.name != SAMPLES_FOLDER:
            client.log_artifacts(parent_run_id, str(entry), f"{REPORT_ARTIFACT_PATH}/{entry.name}")
        elif entry.is_file():
            client.log_artifact(parent_run_id, str(entry), REPORT_ARTIFACT_PATH)
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
    sections.append(_theory_section(tables, out_dir))
    sections.append(_grids_section(tables, out_dir / SAMPLES_FOLDER, metric))
    say("theory and sample grids written")
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


def _theory_section(tables: StudyTables, out_dir: Path) -> str:
    """The paper's predictions beside the measurements: the theory table and four per-layer figures."""
    table = theory_table(tables)
    if table.empty:
        return _section("Theory: the paper's predictions beside the measurements",
                        _note("No trial logged the theory panel (weight_std, sigma_raw, sigma_conv ...)."))
    table.to_csv(out_dir / "tables" / "theory.csv", index=False)
    body = _note(THEORY_NOTE) + _table(table)
    figures = (
        ("theory_std", std_ratio_trends(tables), STD_RATIO, 1.0,
         "Effective weight std / its prediction per D layer (dashed: the prediction)"),
        ("theory_sigma_conv", conv_ratio_trends(tables), CONV_RATIO, 1.0,
         "σ of the conv operator / σ of the (c_out, c_in·k·k) reshape, per D conv layer, at evaluations"),
        ("theory_grad_D", gradient_trends(tables, "D"), GRAD_NORM, None, "D's gradient norm per layer"),
        ("theory_grad_G", gradient_trends(tables, "G"), GRAD_NORM, None, "G's gradient norm per layer"),
    )
    for name, trends, ylabel, reference, title in figures:
        if len(trends):
            fig = plot_layer_trends(trends, ylabel=ylabel, title=title, reference=reference)
            body += f"<h3>{html.escape(title)}</h3>" + _image(save(fig, out_dir / "figures", name)["png"])
    return _section("Theory: the paper's predictions beside the measurements", body)


def _grids_section(tables: StudyTables, folder: Path, metric: str) -> str:
    """Each cell's best and worst seed's last sample grid, one row per cell."""
    chosen = extreme_seeds(tables)
    grids = fetch_sample_grids(tables, chosen["run_id"], folder).set_index("run_id")
    rows = []
    for cell, group in chosen.groupby("cell", sort=False):
        cells = [f"<th>{html.escape(cell or '(base)')}</th>"]
        for trial in group.itertuples(index=False):
            grid = grids.loc[trial.run_id]
            value = "–" if pd.isna(trial.value) else f"{trial.value:.4g}"
            caption = (f"{trial.which}: seed {trial.seed}, {trial.outcome}, final {metric} {value}"
                       + (f", iteration {grid['iteration']}" if grid["path"] is not None else ""))
            image = (_image(Path(grid["path"]), alt=f"samples {trial.which} {cell} seed {trial.seed}")
                     if grid["path"] is not None else "<p>no sample grid logged</p>")
            cells.append(f"<td>{image}<br>{html.escape(caption)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    body = (_note(GRIDS_NOTE.format(metric=metric))
            + "<table class='grids'><tr><th>cell</th><th>best seed</th><th>worst seed</th></tr>"
            + "".join(rows) + "</table>")
    return _section("Sample grids: the best and the worst seed of each cell", body)


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
        "dataset": _distinct(trials, "dataset", "resolution", template="{} at {} px"),
        "architecture": _distinct(trials, "architecture", "width", template="{}, width × {}"),
        "iterations": _distinct(trials, "iterations"),
        "metric": meta["metric"] + (f" ({SURROGATE_METRICS[meta['metric']]})"
                                    if meta["metric"] in SURROGATE_METRICS else ""),
        "divergence policy": _divergence_policy(trials),
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


def _distinct(trials: pd.DataFrame, *columns: str, template: str = "") -> str:
    """The distinct values of these config columns over the trials, formatted by template ('{}' each)."""
    present = [c for c in columns if c in trials]
    if len(present) != len(columns):
        return "–"
    template = template or " ".join("{}" for _ in columns)
    values = trials[present].drop_duplicates().itertuples(index=False)
    return ", ".join(template.format(*(_fmt(v) for v in row)) for row in values)


def _divergence_policy(trials: pd.DataFrame) -> str:
    """Which causes stop a run and which are only recorded, from the trials' divergence.policy params."""
    prefix = "divergence.policy."
    causes = [f"{prefix}{cause}" for cause in DIVERGENCE_CAUSES if f"{prefix}{cause}" in trials]
    policies = []
    for row in trials[causes].drop_duplicates().to_dict("records"):
        by_action: dict[str, list[str]] = {}
        for column, action in row.items():
            by_action.setdefault(str(action), []).append(column.removeprefix(prefix))
        policies.append("; ".join(f"{action}: {', '.join(names)}"
                                  for action, names in sorted(by_action.items())))
    return " | ".join(policies) or "–"


def _fmt(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _paper_values(tables: StudyTables, metric: str) -> list[tuple[str, str, str]]:
    """(trials column, label, best or final) of each paper table: the primary metric's best over training and
    final value, then IS's when the study measured it (the paper reports both FID and IS)."""
    values = [("best_metric", f"best {metric} over training", "best"),
              ("final_metric", f"final {metric}", "final")]
    if tables.trials["final_is"].notna().any():
        values += [("best_is", "best IS over training", "best"), ("final_is", "final IS", "final")]
    return values


def _section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title, quote=False)}</h2>{body}"


def _note(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _table(frame: pd.DataFrame, index: bool = False) -> str:
    return frame.to_html(index=index, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0, escape=True)


def _image(path: Path, alt: str | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt or path.stem)}" src="data:image/png;base64,{data}">'
