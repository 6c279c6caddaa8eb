"""Pull one study's runs from MLflow into the tidy tables of `analysis.schema`, and write them as Parquet.

Reads only MLflow: the study's parent run (found by study name or run id), its child runs (one per trial) with
`MlflowClient.search_runs` in pages, and metric histories in bulk (MetricReader: up to 100 runs per request
on an HTTP server; MlflowClient has no bulk method).
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import requests
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import read_mlflow_creds

from analysis.schema import (
    DIAGNOSTIC_COLUMNS,
    DIAGNOSTIC_KEYS,
    DIAGNOSTIC_PREFIXES,
    EVAL_COLUMNS,
    EVAL_METRICS,
    EVENT_COLUMNS,
    TABLES,
    TRIAL_COLUMNS,
    arrow_schema,
)
from study import layout
from study.tracking import redacted
from trainables.config import TrialConfig

RUNS_PER_REQUEST = 100  # the server's limit for get-history-bulk-interval
MAX_EVALS_PER_TRIAL = (
    2500  # the server's per-run limit; an evaluation every 160 iterations of a 400k run fits
)
PAGE_SIZE = 1000  # runs per search_runs page
# Miyato et al.'s settings A-F: (lr of G and D, beta1, beta2, n_dis).
SETTINGS = {
    "A": (1e-4, 0.5, 0.9, 5),
    "B": (1e-4, 0.5, 0.999, 1),
    "C": (2e-4, 0.5, 0.999, 1),
    "D": (1e-3, 0.5, 0.9, 5),
    "E": (1e-3, 0.5, 0.999, 5),
    "F": (1e-3, 0.9, 0.999, 5),
}
Progress = Callable[[str], None]


class StudyLookupError(LookupError):
    """No study to analyse: an unknown study name or run id, a run that is no study's parent, no trials."""


@dataclass
class StudyTables:
    """A collected study: the four tables of `analysis.schema` and the study's metadata (all str values)."""

    trials: pd.DataFrame
    evals: pd.DataFrame
    events: pd.DataFrame
    diagnostics: pd.DataFrame
    meta: dict[str, str]

    @property
    def axes(self) -> list[str]:
        """The swept axes (the parent run's `axes` tag), seed included."""
        return [a for a in self.meta.get(layout.AXES_TAG, "").split(",") if a]

    @property
    def config_columns(self) -> list[str]:
        return [c for c in self.trials.columns if c not in TRIAL_COLUMNS]

    def write_parquet(self, out_dir: str | Path) -> dict[str, Path]:
        """Write `<out_dir>/<table>.parquet` for each table with its documented schema; returns the paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, columns in TABLES.items():
            frame = getattr(self, name)
            if name == "trials":
                columns = {
                    **columns,
                    **{c: (_arrow_type(frame[c]), "TrialConfig param") for c in self.config_columns},
                }
            schema = arrow_schema(columns, metadata=self.meta)
            table = pa.Table.from_pandas(frame[list(columns)], schema=schema, preserve_index=False)
            paths[name] = out_dir / f"{name}.parquet"
            pq.write_table(table, paths[name])
        return paths

    @classmethod
    def read_parquet(cls, out_dir: str | Path) -> StudyTables:
        """Read the tables `write_parquet` wrote."""
        out_dir = Path(out_dir)
        missing = [n for n in TABLES if not (out_dir / f"{n}.parquet").exists()]
        if missing:
            raise FileNotFoundError(f"{out_dir} lacks {', '.join(f'{n}.parquet' for n in missing)}")
        tables = {n: pq.read_table(out_dir / f"{n}.parquet") for n in TABLES}
        meta = {
            k.decode(): v.decode()
            for k, v in (tables["trials"].schema.metadata or {}).items()
            if not k.startswith(b"pandas")
        }
        frames = {n: t.to_pandas() for n, t in tables.items()}
        return cls(**frames, meta=meta)


def collect(
    tracking_uri: str,
    *,
    study: str | None = None,
    run_id: str | None = None,
    max_points: int = 200,
    progress: Progress | None = None,
) -> StudyTables:
    """Collect a study by name or by its parent run id into tidy tables.

    `max_points` caps the diagnostics per trial and key (MLflow samples evenly, first and last kept).
    Raises StudyLookupError for an unknown study or run id, a run that is not a study's parent, or no trials.
    """
    say = progress or (lambda message: None)
    client = MlflowClient(tracking_uri)
    parent = find_parent_run(client, tracking_uri, study=study, run_id=run_id)
    name = parent.data.tags.get(layout.STUDY_TAG, parent.info.run_name)
    say(f"study {name!r}: parent run {parent.info.run_id}")
    runs = trial_runs(client, parent)
    empty = sorted(r.info.run_id for r in runs if not r.data.params)  # no config: nothing to analyse
    if empty:
        say(f"skipped {len(empty)} empty trial run(s) without params (a create_run whose reply was lost, or "
            f"a trial that died as it started): {', '.join(empty)}")
        runs = [r for r in runs if r.data.params]
    if not runs:
        raise StudyLookupError(f"study {name!r} (parent run {parent.info.run_id}) has no trial runs yet")
    say(f"{len(runs)} trials found")
    reader = MetricReader(client, tracking_uri)
    trials = _trials_frame(runs)
    keys_by_run = {r.info.run_id: set(r.data.metrics) for r in runs}

    eval_rows = reader.histories(
        keys_by_run, EVAL_METRICS, MAX_EVALS_PER_TRIAL, expected_points(trials, "eval_every")
    )
    evals = _evals_frame(eval_rows, trials)
    say(f"{len(evals)} evaluations read")
    diag_keys = sorted({k for keys in keys_by_run.values() for k in keys if _is_diagnostic(k)})
    diagnostics = _diagnostics_frame(
        reader.histories(keys_by_run, diag_keys, max_points, expected_points(trials, "log_every"))
    )
    say(f"{len(diagnostics)} diagnostic points read ({len(diag_keys)} keys)")
    events = _events_frame(client, reader, trials)
    say(f"{len(events)} divergence events read")
    trials = _with_eval_summaries(trials, evals)

    axes = parent.data.tags.get(layout.AXES_TAG, "")
    if not axes:  # a parent without the tag: the config columns that vary are the swept axes
        axes = ",".join(c for c in trials.columns if c not in TRIAL_COLUMNS and trials[c].nunique() > 1)
    trials = _with_bundle_axes(trials, [a for a in axes.split(",") if a])
    meta = {
        "study": name,
        "parent_run_id": parent.info.run_id,
        "experiment_id": parent.info.experiment_id,
        "tracking_uri": redacted(tracking_uri),
        "skipped_runs": ",".join(empty),  # empty trial runs left out
        "study_status": _study_status(parent),
        "axes": axes,
        "metric": trials["metric"].mode().iat[0],
        "collected_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return StudyTables(trials=trials, evals=evals, events=events, diagnostics=diagnostics, meta=meta)


def find_parent_run(
    client: MlflowClient, tracking_uri: str, *, study: str | None = None, run_id: str | None = None
) -> Run:
    """The study's parent run (tag role=study), by run id or by study name (the latest run of that name)."""
    if (study is None) == (run_id is None):
        raise ValueError("give exactly one of study (a study name) or run_id (its parent run id)")
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise StudyLookupError(f"run id {run_id!r} not found at {tracking_uri}") from None
        role = run.data.tags.get(layout.ROLE_TAG)
        if role != layout.STUDY_ROLE:
            raise StudyLookupError(
                f"run {run_id} is not a study's parent run: its tag {layout.ROLE_TAG} is {role!r}, "
                f"expected {layout.STUDY_ROLE!r}"
            )
        return run
    query = layout.tag_filter({layout.ROLE_TAG: layout.STUDY_ROLE, layout.STUDY_TAG: study})
    experiment = client.get_experiment_by_name(study)
    found = _search(client, [experiment.experiment_id], query) if experiment else []
    if not found:  # `tracking.experiment` may have put the study in an experiment of another name
        found = _search(client, _all_experiment_ids(client), query)
    if not found:
        studies = layout.tag_filter({layout.ROLE_TAG: layout.STUDY_ROLE})
        parents = _search(client, _all_experiment_ids(client), studies)
        known = sorted({r.data.tags.get(layout.STUDY_TAG, "") for r in parents})
        raise StudyLookupError(
            f"no study named {study!r} at {tracking_uri}; studies there: "
            f"{', '.join(known) if known else 'none'}"
        )
    return max(found, key=lambda r: r.info.start_time or 0)


def trial_runs(client: MlflowClient, parent: Run) -> list[Run]:
    """The parent's child runs with role=trial (or no role tag), every page."""
    runs = _search(
        client, [parent.info.experiment_id], layout.tag_filter({layout.PARENT_RUN_ID_TAG: parent.info.run_id})
    )
    return [r for r in runs if r.data.tags.get(layout.ROLE_TAG, layout.TRIAL_ROLE) == layout.TRIAL_ROLE]


def _search(client: MlflowClient, experiment_ids: list[str], query: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            experiment_ids, query, ViewType.ACTIVE_ONLY, max_results=PAGE_SIZE, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _all_experiment_ids(client: MlflowClient) -> list[str]:
    ids, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


class MetricReader:
    """Metric histories of many runs in few requests.

    On an HTTP server, runs whose whole history fits in `max_points` (estimated from their last iteration and
    logging period) come in full from `GET /ajax-api/2.0/mlflow/metrics/get-history-bulk`: one SQL query for
    up to 100 runs and 25,000 points; a full answer is split and asked again, so nothing is cut. Longer
    histories are sampled by the server: `GET /api/2.0/mlflow/metrics/get-history-bulk-interval`.
    Other tracking URIs: `MlflowClient.get_metric_history` per run and key, sampled here the same way (first
    and last kept).
    """

    BULK_LIMIT = 25_000  # the server's cap on points per get-history-bulk answer

    def __init__(self, client: MlflowClient, tracking_uri: str, workers: int = 4, bulk: bool | None = None):
        self.client = client
        # bulk: REST bulk requests (default: when the URI is an HTTP server); False: per run and key
        self.http = tracking_uri.startswith(("http://", "https://")) if bulk is None else bulk
        self.base = tracking_uri.rstrip("/")
        self.session = requests.Session()
        credentials = read_mlflow_creds()  # as MLflow's client: the environment, else ~/.mlflow/credentials
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            self.session.headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        elif credentials.username:
            self.session.auth = (credentials.username, credentials.password or "")
        self.workers = workers

    def histories(
        self,
        keys_by_run: dict[str, set[str]],
        keys: Iterable[str],
        max_points: int,
        expected_points: dict[str, int] | None = None,
    ) -> pd.DataFrame:
        """Columns run_id, key, iteration, value, timestamp for every run that logged each key.

        `expected_points` (run id -> points per key, an estimate) picks full reads for short histories; a run
        missing from it is sampled by the server."""
        expected = expected_points or {}
        jobs = []
        for key in keys:
            run_ids = sorted(r for r, run_keys in keys_by_run.items() if key in run_keys)
            if not self.http:
                jobs += [
                    (self._fetch_client, key, run_ids[i : i + RUNS_PER_REQUEST], max_points)
                    for i in range(0, len(run_ids), RUNS_PER_REQUEST)
                ]
                continue
            short = [r for r in run_ids if 0 < expected.get(r, max_points + 1) <= max_points]
            long = [r for r in run_ids if r not in set(short)]
            jobs += [(self._fetch_full, key, batch, max_points) for batch in _batches(short, expected)]
            jobs += [
                (self._fetch_sampled, key, long[i : i + RUNS_PER_REQUEST], max_points)
                for i in range(0, len(long), RUNS_PER_REQUEST)
            ]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            parts = list(pool.map(lambda job: job[0](*job[1:]), jobs))
        rows = [row for part in parts for row in part]
        frame = pd.DataFrame(rows, columns=["run_id", "key", "iteration", "value", "timestamp"])
        return frame.astype({"iteration": "int64", "value": "float64", "timestamp": "int64"})

    def artifact_json(self, run_id: str, path: str) -> Any:
        """A run's JSON artifact in one request (`GET /get-artifact`); None when not served so."""
        if not self.http:
            return None
        response = self.session.get(
            self.base + "/get-artifact", params={"path": path, "run_uuid": run_id}, timeout=60
        )
        return response.json() if response.status_code == 200 else None

    def _get(self, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        response = self.session.get(self.base + path, params=params, timeout=300)
        if response.status_code != 200:
            raise MlflowException(
                f"GET {path} for {params.get('metric_key')!r} failed: HTTP "
                f"{response.status_code} {response.text[:300]}"
            )
        return response.json().get("metrics", [])

    def _fetch_full(self, key: str, run_ids: list[str], max_points: int) -> list[tuple]:
        metrics = self._get(
            "/ajax-api/2.0/mlflow/metrics/get-history-bulk",
            {"run_id": run_ids, "metric_key": key, "max_results": self.BULK_LIMIT},
        )
        if len(metrics) >= self.BULK_LIMIT:  # cut by the server: ask again in halves
            if len(run_ids) == 1:
                return self._fetch_sampled(key, run_ids, max_points)
            half = len(run_ids) // 2
            return self._fetch_full(key, run_ids[:half], max_points) + self._fetch_full(
                key, run_ids[half:], max_points
            )
        return _rows(metrics, key)

    def _fetch_sampled(self, key: str, run_ids: list[str], max_points: int) -> list[tuple]:
        metrics = self._get(
            "/api/2.0/mlflow/metrics/get-history-bulk-interval",
            {"run_ids": run_ids, "metric_key": key, "max_results": max_points},
        )
        return _rows(metrics, key)

    def _fetch_client(self, key: str, run_ids: list[str], max_points: int) -> list[tuple]:
        rows = []
        for run_id in run_ids:
            history = sorted(self.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
            keep = np.unique(np.linspace(0, len(history) - 1, min(len(history), max_points)).round())
            rows += [
                (run_id, key, history[i].step, history[i].value, history[i].timestamp)
                for i in keep.astype(int)
            ]
        return rows


def _rows(metrics: list[dict[str, Any]], key: str) -> list[tuple]:
    return [
        (m["run_id"], key, int(m.get("step", 0)), float(m["value"]), int(m.get("timestamp", 0)))
        for m in metrics
    ]


def _batches(run_ids: list[str], expected: dict[str, int]) -> list[list[str]]:
    """Runs grouped so that each request stays within 100 runs and, by estimate, 25,000 points."""
    batches: list[list[str]] = []
    points = 0
    for run_id in run_ids:
        if not batches or len(batches[-1]) == RUNS_PER_REQUEST or points + expected[run_id] > 20_000:
            batches.append([])
            points = 0
        batches[-1].append(run_id)
        points += expected[run_id]
    return batches


def expected_points(trials: pd.DataFrame, every: str) -> dict[str, int]:
    """Points per key each trial should have logged: last iteration / period (`eval_every`, `log_every`) + 2
    (the first log at iteration 0 and the final report)."""
    if every not in trials or not pd.api.types.is_numeric_dtype(trials[every]):
        return {}
    period = trials[every].where(trials[every] > 0)
    estimate = (trials["last_iteration"].clip(lower=0) // period + 2).fillna(-1).astype("int64")
    return dict(zip(trials["run_id"], estimate, strict=True))


def _is_diagnostic(key: str) -> bool:
    return key in DIAGNOSTIC_KEYS or key.startswith(DIAGNOSTIC_PREFIXES)


def primary_metric(params: dict[str, str]) -> str:
    """The trial's primary metric, as TrialConfig.primary_metric: first of `metrics`, else by dataset."""
    try:
        names = tuple(ast.literal_eval(params.get("metrics", "()")))
    except (ValueError, SyntaxError):
        names = ()
    if not names:
        return "fd_digits" if params.get("dataset", "digits") == "digits" else "fid"
    return "fid" if names[0] == "is" else names[0]


def _trial_status(run: Run) -> str:
    tag = run.data.tags.get(layout.STATUS_TAG, "")
    state = run.info.status
    if state in ("FAILED", "KILLED"):  # a crashed worker leaves its last tag behind
        return layout.FAILED
    if tag in layout.TRIAL_STATUSES:
        return tag
    if state == "FINISHED":
        return layout.DIVERGED if run.data.tags.get(layout.DIVERGED_TAG) == "1" else layout.FINISHED
    return layout.RUNNING


def _study_status(parent: Run) -> str:
    tag = parent.data.tags.get(layout.STATUS_TAG, "")
    if tag:
        return tag
    return {"RUNNING": layout.RUNNING, "SCHEDULED": layout.RUNNING, "FINISHED": layout.FINISHED}.get(
        parent.info.status, layout.FAILED
    )


def _config_types() -> dict[str, type]:
    return {k: type(v) for k, v in _flat_defaults().items() if v is not None}


def _flat_defaults() -> dict[str, Any]:
    defaults = TrialConfig().model_dump()
    flat: dict[str, Any] = {}
    for key in layout.flatten(defaults):
        value: Any = defaults
        for part in key.split("."):
            value = value[part]
        flat[key] = value
    return flat


def _typed_column(values: pd.Series, kind: type | None) -> pd.Series:
    """A param column (strings) in the type of its TrialConfig default; unknown keys: numeric if all parse."""
    if kind is bool:
        return values.map({"true": True, "false": False, "True": True, "False": False})  # JSON or str()
    if kind in (int, float) or kind is None:
        numbers = pd.to_numeric(values, errors="coerce")
        if kind is None and numbers.isna().any() and values.notna().any():
            return values.astype(object)
        if kind is int and not numbers.isna().any():
            return numbers.astype("int64")
        return numbers.astype("float64")
    return values.astype(object)


def _with_bundle_axes(trials: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Axes that are no config field (a bundle such as `lr` setting g_lr and d_lr together) get a column
    of their labels, read from each trial's `cell` tag (`beta1=0.5,lr=1e-3,variant=sn`)."""
    missing = [axis for axis in axes if axis != "seed" and axis not in trials.columns]
    if not missing:
        return trials
    cells = [layout.parse_cell(cell) for cell in trials["cell"]]
    labels = {axis: _typed_column(pd.Series([c.get(axis, "") for c in cells], index=trials.index), None)
              for axis in missing}
    return trials.assign(**labels)


def _trials_frame(runs: list[Run]) -> pd.DataFrame:
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        status = _trial_status(run)
        start = pd.Timestamp(run.info.start_time, unit="ms", tz="UTC") if run.info.start_time else pd.NaT
        end = (
            pd.Timestamp(run.info.end_time, unit="ms", tz="UTC")
            if run.info.end_time and status != "running"
            else pd.NaT
        )
        rows.append(
            {
                "run_id": run.info.run_id,
                "trial_id": tags.get(layout.TRIAL_ID_TAG, ""),
                "cell": tags.get(layout.CELL_TAG, ""),
                "status": status,
                "outcome": layout.outcome(tags, run.info.status),
                "complete": status in layout.ENDED_STATUSES,
                "mlflow_status": run.info.status,
                "diverged": tags.get(layout.DIVERGED_TAG, "0") == "1" or metrics.get("diverged", 0) == 1,
                "divergence_cause": tags.get(layout.DIVERGENCE_CAUSE_TAG, ""),
                "divergence_step": int(
                    float(tags.get(layout.DIVERGENCE_STEP_TAG, metrics.get("divergence_step", -1)))
                ),
                "events": int(metrics.get("events", -1)),
                "last_iteration": int(metrics.get("iteration", -1)),
                "metric": primary_metric(run.data.params),
                "start_time": start,
                "end_time": end,
                "wall_time_s": (end - start).total_seconds()
                if end is not pd.NaT and start is not pd.NaT
                else np.nan,
                **{f"param:{k}": v for k, v in run.data.params.items()},
            }
        )
    frame = pd.DataFrame(rows)
    types = _config_types()
    params = {
        c.removeprefix("param:"): _typed_column(frame[c], types.get(c.removeprefix("param:")))
        for c in frame.columns
        if c.startswith("param:")
    }
    frame = pd.concat(
        [
            frame[[c for c in frame.columns if not c.startswith("param:")]],
            pd.DataFrame(params, index=frame.index),
        ],
        axis=1,
    )
    frame["setting"] = _settings(frame)
    return frame.sort_values(["cell", "trial_id", "run_id"], ignore_index=True)


def _settings(frame: pd.DataFrame) -> pd.Series:
    """Miyato et al.'s setting letter of each trial, '' when its optimiser matches none of A-F."""
    setting = pd.Series("", index=frame.index, dtype=object)
    needed = ("g_lr", "d_lr", "beta1", "beta2", "n_dis")
    if not all(c in frame for c in needed):
        return setting
    for letter, (lr, beta1, beta2, n_dis) in SETTINGS.items():
        match = (
            np.isclose(frame["g_lr"], lr)
            & np.isclose(frame["d_lr"], lr)
            & np.isclose(frame["beta1"], beta1)
            & np.isclose(frame["beta2"], beta2)
            & (frame["n_dis"] == n_dis)
        )
        setting[match] = letter
    return setting


def _evals_frame(rows: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    columns = list(EVAL_COLUMNS)
    if rows.empty:
        return pd.DataFrame(
            {
                c: pd.Series(dtype="int64" if c == "iteration" else object if c == "run_id" else "float64")
                for c in columns
            }
        )
    # A resumed trial may log a step twice: the later write wins.
    rows = rows.sort_values("timestamp").drop_duplicates(["run_id", "key", "iteration"], keep="last")
    wide = rows.pivot(index=["run_id", "iteration"], columns="key", values="value").reset_index()
    wide.columns.name = None
    for key in EVAL_METRICS:
        if key not in wide:
            wide[key] = np.nan
    primary = wide["run_id"].map(trials.set_index("run_id")["metric"])
    wide["metric"] = [
        row[name] if name in wide else np.nan
        for row, name in zip(wide.to_dict("records"), primary, strict=True)
    ]
    wide = wide.dropna(subset=["objective", "metric"], how="all")
    return wide[columns].sort_values(["run_id", "iteration"], ignore_index=True)


def _with_eval_summaries(trials: pd.DataFrame, evals: pd.DataFrame) -> pd.DataFrame:
    """Add final and best primary metric, IS and KID, the final objective and the number of evaluations."""
    measured = evals.dropna(subset=["metric"])
    grouped = measured.groupby("run_id")
    last = evals.sort_values("iteration").groupby("run_id").last()  # last non-null value of each column
    best_at = measured.loc[grouped["metric"].idxmin()].set_index("run_id") if len(measured) else None
    out = trials.copy()
    run = out["run_id"]
    out["final_metric"] = run.map(last["metric"]).astype("float64")
    out["best_metric"] = run.map(grouped["metric"].min()).astype("float64")
    out["best_metric_iteration"] = (
        (run.map(best_at["iteration"]) if best_at is not None else pd.Series(np.nan, index=out.index))
        .fillna(-1)
        .astype("int64")
    )
    out["final_objective"] = run.map(last["objective"]).astype("float64")
    out["final_is"] = run.map(last["is"]).astype("float64")
    out["best_is"] = run.map(evals.groupby("run_id")["is"].max()).astype("float64")
    out["final_kid"] = run.map(last["kid"]).astype("float64")
    out["best_kid"] = run.map(evals.groupby("run_id")["kid"].min()).astype("float64")
    out["n_evals"] = run.map(grouped.size()).fillna(0).astype("int64")
    config = [c for c in trials.columns if c not in TRIAL_COLUMNS]
    return out[list(TRIAL_COLUMNS) + config]


def _diagnostics_frame(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.sort_values("timestamp").drop_duplicates(["run_id", "key", "iteration"], keep="last")
    parts = rows["key"].str.split("/", n=2, expand=False)
    rows = rows.assign(
        quantity=parts.str[0],
        network=[p[1] if p[0] == "grad_norm" and len(p) > 1 else "" for p in parts],
        layer=[("/".join(p[2:]) if p[0] == "grad_norm" else "/".join(p[1:])) for p in parts],
    )
    return rows[list(DIAGNOSTIC_COLUMNS)].sort_values(["run_id", "key", "iteration"], ignore_index=True)


def _events_frame(client: MlflowClient, reader: MetricReader, trials: pd.DataFrame) -> pd.DataFrame:
    """Rows of each trial's events artifact; read only for trials that recorded events or diverged."""
    wanted = trials.loc[(trials["events"] > 0) | trials["diverged"], "run_id"].tolist()

    def read(run_id: str) -> list[dict[str, Any]]:
        events = reader.artifact_json(run_id, layout.EVENTS_ARTIFACT)
        if events is None:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    path = client.download_artifacts(run_id, layout.EVENTS_ARTIFACT, tmp)
                except (MlflowException, OSError):  # a trial that stopped before writing it
                    return []
                events = json.loads(Path(path).read_text())
        return [
            {
                "run_id": run_id,
                "cause": e.get("cause", ""),
                "iteration": int(e.get("iteration", -1)),
                "action": e.get("action", ""),
                "values": json.dumps(e.get("values", {})),
                "thresholds": json.dumps(e.get("thresholds", {})),
            }
            for e in events
        ]

    with ThreadPoolExecutor(max_workers=4) as pool:
        rows = [row for part in pool.map(read, wanted) for row in part]
    frame = pd.DataFrame(rows, columns=list(EVENT_COLUMNS))
    return frame.astype({"iteration": "int64"})


def _arrow_type(column: pd.Series) -> pa.DataType:
    if pd.api.types.is_bool_dtype(column):
        return pa.bool_()
    if pd.api.types.is_integer_dtype(column):
        return pa.int64()
    if pd.api.types.is_float_dtype(column):
        return pa.float64()
    return pa.string()


def fetch_sample_grids(tables: StudyTables, run_ids: Iterable[str], out_dir: str | Path,
                       workers: int = 4) -> pd.DataFrame:
    """Download each run's last sample grid (its `layout.SAMPLES_PATTERN` artifact of the highest iteration)
    into `out_dir/<run_id>/`. Columns: run_id, iteration (-1 and path None for a run that logged none), path.
    """
    client = MlflowClient(tables.meta["tracking_uri"])
    folder = layout.SAMPLES_PATTERN.split("/", 1)[0]
    out_dir = Path(out_dir)

    def fetch(run_id: str) -> dict[str, Any]:
        try:
            grids = sorted(a.path for a in client.list_artifacts(run_id, folder)
                           if fnmatch.fnmatch(a.path, layout.SAMPLES_PATTERN))
        except (MlflowException, OSError):
            grids = []
        if not grids:
            return {"run_id": run_id, "iteration": -1, "path": None}
        last = grids[-1]  # iter_XXXXXXX.png: zero-padded, so the last name is the last iteration
        (out_dir / run_id).mkdir(parents=True, exist_ok=True)
        path = client.download_artifacts(run_id, last, str(out_dir / run_id))
        return {"run_id": run_id, "iteration": int(Path(last).stem.rsplit("_", 1)[-1]), "path": Path(path)}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(fetch, dict.fromkeys(run_ids)))
    return pd.DataFrame(rows, columns=["run_id", "iteration", "path"])
