"""MLflow for a study: where it goes, the parent run of the study, the child run of each trial.

The names of its tags, params, statuses and artifacts (what analysis/ reads) are study/layout.py's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from study import layout
from study.spec import StudyError, StudySpec

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_STORAGE = "runs"
REACH_TIMEOUT_S = 15.0
VERSIONED_PACKAGES = ("torch", "ray", "mlflow", "optuna", "gan-stability")
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
MAX_METRICS_PER_BATCH = 1000


def resolve_tracking_uri(cli_uri: str | None, spec: StudySpec, cwd: Path) -> str:
    """--tracking-uri, else the spec's, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.

    A relative sqlite path is made absolute because Ray runs each trial in its own working directory.
    """
    uri = cli_uri or spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(cwd / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def resolve_storage(cli_storage: str | None, spec: StudySpec, cwd: Path) -> str:
    """--storage, else the spec's, else $GAN_STABILITY_STORAGE, else ./runs; local paths made absolute."""
    storage = cli_storage or spec.storage or os.environ.get("GAN_STABILITY_STORAGE") or DEFAULT_STORAGE
    if "://" in storage:
        return storage
    return str((cwd / Path(storage).expanduser()).resolve())


def check_tracking_uri(uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Refuse a tracking URI MLflow could not write to, within `timeout` seconds; writes nothing."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).parent
        _check_writable_folder(folder, f"--tracking-uri {uri}")
    elif scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                if response.status != 200:
                    raise StudyError(f"--tracking-uri {uri}: /health answered HTTP {response.status}")
        except (urllib.error.URLError, OSError) as exc:
            raise StudyError(f"--tracking-uri {uri}: no MLflow server answered within {timeout:g} s "
                             f"({getattr(exc, 'reason', exc)}); start one or pass another URI") from None
    elif scheme in ("postgresql", "mysql", "mssql") or scheme.startswith(("postgresql+", "mysql+")):
        parsed = urllib.parse.urlparse(uri)
        port = parsed.port or {"postgresql": 5432, "mysql": 3306, "mssql": 1433}.get(scheme.split("+")[0])
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        except OSError as exc:
            raise StudyError(f"--tracking-uri {uri}: database unreachable within {timeout:g} s "
                             f"({exc})") from None
    elif scheme == "file" or scheme == "":
        _check_writable_folder(Path(uri.removeprefix("file://")), f"--tracking-uri {uri}")
    else:
        raise StudyError(f"--tracking-uri {uri}: unsupported scheme {scheme!r}; valid: sqlite:///PATH, "
                         "http(s)://HOST:PORT, postgresql://..., mysql://..., file:PATH")


def check_storage(storage: str) -> None:
    """Refuse a local storage folder that cannot be written; s3:// and other remote URIs are left to Ray."""
    if "://" not in storage:
        _check_writable_folder(Path(storage), f"--storage {storage}")


def _check_writable_folder(folder: Path, what: str) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StudyError(f"{what}: {existing} is not a folder")
    try:  # a probe file, removed at once: permission bits miss read-only mounts and root
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise StudyError(f"{what}: cannot write in {existing} ({exc.strerror})") from None


def package_versions() -> dict[str, str]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[f"{layout.VERSION_TAG_PREFIX}{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[f"{layout.VERSION_TAG_PREFIX}{package}"] = "not installed"
    return versions


def git_commit(repository: Path) -> str:
    """HEAD's commit, with `+dirty` when the working tree has changes; "unknown" outside a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repository, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repository,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])


def study_experiment(client: MlflowClient, spec: StudySpec) -> str:
    """The experiment id of the study (created on first use)."""
    name = spec.tracking.experiment or spec.name
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


def latest_parent_run(client: MlflowClient, experiment_id: str, study: str):
    """The study's most recent parent run, or None."""
    parents = layout.tag_filter({layout.ROLE_TAG: layout.STUDY_ROLE, layout.STUDY_TAG: study})
    runs = client.search_runs([experiment_id], parents, order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


def create_parent_run(client: MlflowClient, experiment_id: str, spec: StudySpec, preset: str,
                      ray_experiment: str, repository: Path) -> str:
    """The study's parent run: tags, the flattened spec as params, and spec.yaml as an artifact."""
    tags = {layout.ROLE_TAG: layout.STUDY_ROLE, layout.STUDY_TAG: spec.name, layout.PRESET_TAG: preset,
            layout.GIT_COMMIT_TAG: git_commit(repository), layout.AXES_TAG: ",".join(spec.axis_names),
            layout.STATUS_TAG: layout.RUNNING, layout.RAY_EXPERIMENT_TAG: ray_experiment,
            **package_versions()}
    run = client.create_run(experiment_id, run_name=spec.name, tags=tags)
    values = spec.model_dump(mode="json")
    log_params(client, run.info.run_id, layout.flatten(values))
    client.log_text(run.info.run_id, yaml.safe_dump(values, sort_keys=False), layout.SPEC_ARTIFACT)
    return run.info.run_id


def finish_parent_run(client: MlflowClient, run_id: str, status: str) -> None:
    """Close the study's parent run with `status` (layout.FINISHED or layout.FAILED)."""
    client.set_tag(run_id, layout.STATUS_TAG, status)
    client.set_terminated(run_id, layout.MLFLOW_END_STATUS[status])


def find_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str, cell: str,
                   seed: int | str) -> str | None:
    """The run of the study's trial (cell, seed): a trial's identity, whichever Tune trial runs it.

    A driver restored from a snapshot of Tune's state older than its last trials re-creates them under new
    Tune trial ids; they find their runs here and continue them (or, ended, hand back their result).
    """
    runs = client.search_runs([experiment_id], layout.tag_filter({
        layout.PARENT_RUN_ID_TAG: parent_run_id, layout.ROLE_TAG: layout.TRIAL_ROLE, layout.CELL_TAG: cell,
        layout.SEED_TAG: str(seed)}), max_results=1)
    return runs[0].info.run_id if runs else None


def trial_outcomes(client: MlflowClient, experiment_id: str, parent_run_id: str) -> Counter[str]:
    """How many of the study's trial runs have each outcome (`layout.outcome`; RUNNING: none yet)."""
    query = layout.tag_filter({layout.PARENT_RUN_ID_TAG: parent_run_id, layout.ROLE_TAG: layout.TRIAL_ROLE})
    counts: Counter[str] = Counter()
    token = None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        counts.update(layout.outcome(run.data.tags, run.info.status) for run in page)
        token = page.token
        if not token:
            return counts


class TrialRun:
    """The MLflow child run of one trial: logs each report once, however often the trial is resumed."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id
        recorded = client.get_run(run_id).data
        # Steps already logged (a crashed attempt may have logged past its last checkpoint): never log twice.
        self.last_step = int(recorded.metrics.get("iteration", -1))
        # The trial's own final report, when it has already ended (see `final_result`).
        self.ended = recorded.tags.get(layout.STATUS_TAG) in layout.ENDED_STATUSES
        self._recorded = recorded
        self.logged_artifacts: dict[str, float] = {}  # path relative to workdir -> mtime when logged
        self.log_seconds = 0.0  # time spent talking to MLflow (the service's overhead)

    @classmethod
    def open(cls, client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str,
             run_name: str, tags: dict[str, str], params: dict[str, str]) -> TrialRun:
        """Continue the run of the trial (tags cell, seed) under the parent, else create it."""
        started = time.perf_counter()
        run_id = find_trial_run(client, experiment_id, parent_run_id, tags[layout.CELL_TAG],
                                tags[layout.SEED_TAG])
        reopened = run_id is not None
        if run_id is None:
            all_tags = {layout.PARENT_RUN_ID_TAG: parent_run_id, layout.ROLE_TAG: layout.TRIAL_ROLE,
                        layout.TRIAL_ID_TAG: trial_id, layout.STATUS_TAG: layout.RUNNING,
                        layout.DIVERGED_TAG: "0", layout.DIVERGENCE_CAUSE_TAG: "",
                        layout.DIVERGENCE_STEP_TAG: "-1", **tags}
            run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
            log_params(client, run_id, params)
        run = cls(client, run_id)
        if reopened and not run.ended:  # an ended run stays as it was: never reopened, never closed twice
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, layout.STATUS_TAG, layout.RUNNING)
        run.log_seconds += time.perf_counter() - started
        return run

    def final_result(self) -> dict[str, Any]:
        """What an ended trial reported last (latest value of each metric, its divergence tags).

        A driver killed just after a trial ended may restore it from an older snapshot of Tune's state; the
        trial then hands Tune this instead of training again.
        """
        tags, metrics = self._recorded.tags, self._recorded.metrics
        return {**metrics, "iteration": int(metrics.get("iteration", 0)), "outcome": layout.outcome(tags),
                "divergence_cause": tags.get(layout.DIVERGENCE_CAUSE_TAG, ""),
                "divergence_step": int(tags.get(layout.DIVERGENCE_STEP_TAG, -1))}

    def log_report(self, metrics: dict[str, Any]) -> bool:
        """Log each numeric value of a report at step = iteration; False when that step was logged before."""
        step = int(metrics["iteration"])
        if step <= self.last_step:
            return False
        started = time.perf_counter()
        timestamp = int(time.time() * 1000)
        items = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()
                 if isinstance(value, int | float) and not isinstance(value, bool)]
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start:start + MAX_METRICS_PER_BATCH])
        self.last_step = step
        self.log_seconds += time.perf_counter() - started
        return True

    def log_new_artifacts(self, workdir: Path, paths: Iterable[Path]) -> None:
        """Upload the files that are new or changed since they were last logged (samples, events.json)."""
        started = time.perf_counter()
        for path in paths:
            relative = path.relative_to(workdir)
            mtime = path.stat().st_mtime
            if self.logged_artifacts.get(str(relative)) == mtime:
                continue
            folder = str(relative.parent) if str(relative.parent) != "." else None
            self.client.log_artifact(self.run_id, str(path), folder)
            self.logged_artifacts[str(relative)] = mtime
        self.log_seconds += time.perf_counter() - started

    def finish(self, summary: dict[str, Any]) -> None:
        """Tags from the final report; the run ends FINISHED (a divergence is a result, not a failure)."""
        if self.ended:  # a resumed trial reports its summary again: the run already holds it
            return
        started = time.perf_counter()
        diverged = int(summary.get("diverged", 0))
        status = layout.DIVERGED if diverged else layout.FINISHED
        tags = {layout.STATUS_TAG: status, layout.DIVERGED_TAG: str(diverged),
                layout.OUTCOME_TAG: str(summary["outcome"]),
                layout.DIVERGENCE_CAUSE_TAG: str(summary.get("divergence_cause", "")),
                layout.DIVERGENCE_STEP_TAG: str(int(summary.get("divergence_step", -1)))}
        self.client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in tags.items()])
        self.client.set_terminated(self.run_id, layout.MLFLOW_END_STATUS[status])
        self.ended = True
        self.log_seconds += time.perf_counter() - started
