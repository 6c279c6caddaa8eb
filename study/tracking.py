"""MLflow for a study: where it goes, the parent run of the study, the child run of each trial.

The names of its tags, params, statuses and artifacts (what analysis/ reads) are study/layout.py's.
- URIs are parsed with urllib (credentials in their userinfo) and shown only `redacted`.
- Each run is created once per client-side key (RUN_KEY_TAG): a create_run whose reply was lost is retried by
  MLflow's client and commits a second run; the search after each create finds both and deletes the empty one.
- Every MLflow call of a trial, and the driver's closing calls, go through a `TrackingGuard`, which waits out
  an outage of an HTTP tracking server (up to `tracking.outage_wait_s`) instead of failing the trial.
- The study state file (`<storage>/<study>.study.json`, written at each start) is what `--resume` trusts: the
  Ray experiment, the parent run and the spec the study started with. Nothing is taken from tracking tags.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.fs
import requests
import yaml
from mlflow.entities import DatasetInput, Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from study import layout
from study.spec import Bundle, StudyError, StudySpec
from trainables.files import write_text_atomically

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_STORAGE = "runs"
REACH_TIMEOUT_S = 15.0
VERSIONED_PACKAGES = ("torch", "ray", "mlflow", "optuna", "gan-stability")
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
MAX_METRICS_PER_BATCH = 1000
HEALTH_POLL_S = 2.0  # how often a waiting trial asks the tracking server's /health
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
# The password of a URI's userinfo (scheme, `://`, user, `:`, password, `@`), wherever it appears in a text.
URI_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):[^/\s@]*@")
# Ray folders this driver names: `<study>-<YYYYmmdd-HHMMSS>-<8 hex digits>`, nothing else is restored.
RAY_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*-\d{8}-\d{6}-[0-9a-f]{8}")
STATE_SUFFIX = ".study.json"
# Spec fields that say where a study runs and how long it waits, not what it runs: `--resume` may change them
# (a tracking server that moved, credentials rotated).
RESUME_FREE_FIELDS = ("tracking.uri", "tracking.outage_wait_s", "storage")
OUTAGE_ERROR_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


# ---- URIs: parsed, checked, shown without their passwords -------------------------------------------------

def redacted(text: str) -> str:
    """`text` with the password of every URI in it replaced by three stars (the user name kept): what this
    package prints, logs to MLflow or raises about a tracking URI or a storage URI."""
    return URI_PASSWORD.sub(r"\g<head>:***@", text)


def quiet_mlflow() -> None:
    """This process's MLflow client prints no run links (they would show the tracking URI, password and all)
    and no progress bar per artifact read. Called by the driver and by each trial (a cluster's workers do
    not inherit the driver's environment)."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def split_uri(uri: str, what: str) -> urllib.parse.SplitResult:
    """The URI's parts; StudyError naming `what` when urllib cannot parse it (`http://[::1`, port `abc`)."""
    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018 (urllib parses the port lazily: a port that is no number raises here)
    except ValueError as exc:
        raise StudyError(f"{what}: not a valid URI ({redacted(str(exc))})") from None
    return parts


def health_url(uri: str) -> str:
    """`/health` of an HTTP tracking URI, without its userinfo (MLflow serves /health to anyone)."""
    parts = urllib.parse.urlsplit(uri)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, f"{parts.path.rstrip('/')}/health", "", ""))


def server_healthy(uri: str, timeout: float) -> bool:
    """True when the HTTP tracking server answers /health with 200 within `timeout` seconds."""
    try:
        with urllib.request.urlopen(health_url(uri), timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


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
    what = f"--tracking-uri {redacted(uri)}"
    parts = split_uri(uri, what)
    scheme = parts.scheme
    if scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).parent
        check_writable_folder(folder, what)
    elif scheme in ("http", "https"):
        if not parts.hostname:
            raise StudyError(f"{what}: no host; expected {scheme}://HOST:PORT")
        try:
            with urllib.request.urlopen(health_url(uri), timeout=timeout) as response:
                if response.status != 200:
                    raise StudyError(f"{what}: /health answered HTTP {response.status}")
        except (urllib.error.URLError, OSError) as exc:
            raise StudyError(f"{what}: no MLflow server answered within {timeout:g} s "
                             f"({redacted(str(getattr(exc, 'reason', exc)))}); start one or pass another URI"
                             ) from None
    elif scheme in DATABASE_PORTS or scheme.startswith(("postgresql+", "mysql+")):
        if not parts.hostname:
            raise StudyError(f"{what}: no host; expected {scheme}://USER@HOST:PORT/DATABASE")
        port = parts.port or DATABASE_PORTS.get(scheme.split("+")[0])
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
        except OSError as exc:
            raise StudyError(f"{what}: database unreachable within {timeout:g} s ({exc})") from None
    elif scheme == "file" or scheme == "":
        check_writable_folder(Path(uri.removeprefix("file://")), what)
    else:
        raise StudyError(f"{what}: unsupported scheme {scheme!r}; valid: sqlite:///PATH, "
                         "http(s)://HOST:PORT, postgresql://..., mysql://..., file:PATH")


def check_storage(storage: str) -> None:
    """Refuse a local storage folder that cannot be written, or a storage URI urllib cannot parse; what an
    s3:// or gs:// URI reaches is left to Ray."""
    what = f"--storage {redacted(storage)}"
    if "://" in storage:
        split_uri(storage, what)
    else:
        check_writable_folder(Path(storage), what)


def check_writable_folder(folder: Path, what: str) -> None:
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


@contextmanager
def sqlite_schema_lock(uri: str) -> Iterator[None]:
    """An exclusive lock on `<database>.lock` for a sqlite URI (nothing for others): two drivers starting at
    once on a new database would both run MLflow's schema migration and leave it half-migrated."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def tracking_client(uri: str) -> MlflowClient:
    """A client whose store is created (a new sqlite database: its schema migrated) under the schema lock."""
    with sqlite_schema_lock(uri):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # opens the store now: MLflow creates a schema on first use
    return client


def study_experiment(client: MlflowClient, spec: StudySpec) -> str:
    """The experiment id of the study (created on first use, also when a twin driver creates it first), of
    MLflow's kind for training runs."""
    name = spec.tracking.experiment or spec.name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        try:
            experiment_id = client.create_experiment(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment_id = client.get_experiment_by_name(name).experiment_id
    client.set_experiment_tag(experiment_id, layout.EXPERIMENT_KIND_TAG, layout.EXPERIMENT_KIND)
    return experiment_id


def search_all(client: MlflowClient, experiment_id: str, query: str) -> list[Run]:
    """Every active run of the experiment matching `query`, all pages."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def create_run_once(client: MlflowClient, experiment_id: str, key: str, run_name: str,
                    tags: dict[str, str]) -> str:
    """The id of the run carrying RUN_KEY_TAG = key: found, else created (search, create, search again).

    A create_run whose reply was lost is retried by MLflow's client and commits a second run with the same
    key: the run with data (else the first created) is kept, the empty twins are deleted.
    """
    def keyed() -> list[Run]:
        return search_all(client, experiment_id, layout.tag_filter({layout.RUN_KEY_TAG: key}))

    runs = keyed()
    if not runs:
        client.create_run(experiment_id, run_name=run_name, tags={**tags, layout.RUN_KEY_TAG: key})
        runs = keyed()
    kept, *twins = sorted(runs, key=lambda run: (not (run.data.params or run.data.metrics),
                                                 run.info.start_time, run.info.run_id))
    for twin in twins:
        if not (twin.data.params or twin.data.metrics):
            client.delete_run(twin.info.run_id)
    return kept.info.run_id


def log_inputs(client: MlflowClient, run_id: str, datasets: list[DatasetInput]) -> None:
    """Log the run's dataset inputs; once more if that fails. Trials starting together race to create their
    shared dataset's row (MLflow finds none, then both insert: a unique-constraint error for the second,
    seen with two trials on a cluster); the second attempt finds the row and links it. What fails twice is
    raised."""
    try:
        client.log_inputs(run_id, datasets=datasets)
    except MlflowException:
        client.log_inputs(run_id, datasets=datasets)


def redacted_values(values: Any) -> Any:
    """Nested spec values with every string `redacted` (tracking.uri and storage may hold credentials)."""
    if isinstance(values, dict):
        return {key: redacted_values(value) for key, value in values.items()}
    if isinstance(values, list):
        return [redacted_values(value) for value in values]
    return redacted(values) if isinstance(values, str) else values


def create_parent_run(client: MlflowClient, experiment_id: str, spec: StudySpec, preset: str,
                      ray_experiment: str, repository: Path) -> str:
    """The study's parent run: tags, the flattened spec as params, and spec.yaml as an artifact (URIs
    redacted); created once however often the request is retried (a key of this start)."""
    tags = {layout.ROLE_TAG: layout.STUDY_ROLE, layout.STUDY_TAG: spec.name, layout.PRESET_TAG: preset,
            layout.GIT_COMMIT_TAG: git_commit(repository), layout.AXES_TAG: ",".join(spec.axis_names),
            layout.STATUS_TAG: layout.RUNNING, layout.RAY_EXPERIMENT_TAG: redacted(ray_experiment),
            layout.SPEC_HASH_TAG: spec_digest(resume_fields(spec)), layout.DRIVER_TAG: driver_identity(),
            layout.SOURCE_NAME_TAG: layout.SOURCE_NAME, **package_versions()}
    run_id = create_run_once(client, experiment_id, uuid.uuid4().hex, spec.name, tags)
    client.set_experiment_tag(experiment_id, layout.SHARED_VIEW_TAG_PREFIX + layout.REVIEW_VIEW,
                              json.dumps(layout.review_view(swept_fields(spec))))
    values = redacted_values(spec.model_dump(mode="json"))
    log_params(client, run_id, layout.flatten(values))
    client.log_text(run_id, yaml.safe_dump(values, sort_keys=False), layout.SPEC_ARTIFACT)
    return run_id


def reopen_parent_run(client: MlflowClient, run_id: str) -> None:
    """A resumed study's parent run: RUNNING again, under this driver."""
    client.update_run(run_id, status="RUNNING")
    client.log_batch(run_id, tags=[RunTag(layout.STATUS_TAG, layout.RUNNING),
                                   RunTag(layout.DRIVER_TAG, driver_identity())])


def swept_fields(spec: StudySpec) -> list[str]:
    """The trial-config fields the study's axes set, in the spec's order (a bundle's fields, e.g. `g_lr` and
    `d_lr` for an `lr` bundle)."""
    fields: dict[str, None] = {}
    for axes in spec.axis_sets:
        for name, axis in axes.items():
            bundle = axis.bundle.values() if isinstance(axis, Bundle) else [{name: None}]
            fields |= dict.fromkeys(field for settings in bundle for field in settings)
    return list(fields)


def finish_parent_run(client: MlflowClient, run_id: str, status: str) -> None:
    """Close the study's parent run with `status` (layout.FINISHED, FAILED or KILLED)."""
    client.set_tag(run_id, layout.STATUS_TAG, status)
    client.set_terminated(run_id, layout.MLFLOW_END_STATUS[status])


def find_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str, cell: str,
                   seed: int | str) -> str | None:
    """The run of the study's trial (cell, seed): a trial's identity, whichever Tune trial runs it.

    A driver restored from a snapshot of Tune's state older than its last trials re-creates them under new
    Tune trial ids; they find their runs here and continue them (or, ended, hand back their result).
    """
    key = layout.trial_run_key(parent_run_id, cell, seed)
    runs = client.search_runs([experiment_id], layout.tag_filter({layout.RUN_KEY_TAG: key}), max_results=1)
    return runs[0].info.run_id if runs else None


def close_running_trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str,
                             status: str) -> list[str]:
    """Close the parent's trial runs still RUNNING with `status`; their ids."""
    query = (layout.tag_filter({layout.PARENT_RUN_ID_TAG: parent_run_id, layout.ROLE_TAG: layout.TRIAL_ROLE})
             + " AND attributes.status = 'RUNNING'")
    runs = search_all(client, experiment_id, query)
    for run in runs:
        client.set_tag(run.info.run_id, layout.STATUS_TAG, status)
        client.set_terminated(run.info.run_id, layout.MLFLOW_END_STATUS[status])
    return [run.info.run_id for run in runs]


def trial_outcomes(client: MlflowClient, experiment_id: str, parent_run_id: str) -> Counter[str]:
    """How many of the study's trial runs have each outcome (`layout.outcome`; RUNNING: none yet)."""
    query = layout.tag_filter({layout.PARENT_RUN_ID_TAG: parent_run_id, layout.ROLE_TAG: layout.TRIAL_ROLE})
    return Counter(layout.outcome(run.data.tags, run.info.status)
                   for run in search_all(client, experiment_id, query))


def close_runs_of_dead_drivers(client: MlflowClient, experiment_id: str, study: str) -> list[str]:
    """Parent runs of the study left RUNNING by a driver that died on this machine (SIGKILL, a lost node):
    each closed KILLED with its RUNNING trial runs. A driver still alive, or on another machine, is left be.
    Returns the parent run ids closed."""
    query = (layout.tag_filter({layout.ROLE_TAG: layout.STUDY_ROLE, layout.STUDY_TAG: study})
             + " AND attributes.status = 'RUNNING'")
    closed = []
    for parent in search_all(client, experiment_id, query):
        if driver_alive(parent.data.tags.get(layout.DRIVER_TAG, "")) is not False:
            continue
        close_running_trial_runs(client, experiment_id, parent.info.run_id, layout.KILLED)
        finish_parent_run(client, parent.info.run_id, layout.KILLED)
        closed.append(parent.info.run_id)
    return closed


# ---- the driver process: who runs a study, and whether it still does -----------------------------------

def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, it names
    one process, never a later one that reuses the pid; "" without /proc or without that process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def driver_identity() -> str:
    """DRIVER_TAG of this process: `host:pid:start`."""
    return f"{socket.gethostname()}:{os.getpid()}:{process_start(os.getpid())}"


def driver_alive(identity: str) -> bool | None:
    """Whether the driver DRIVER_TAG names still runs; None when that cannot be told (another host)."""
    host, _, rest = identity.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    if not Path("/proc").is_dir():  # no /proc: the pid alone
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return process_start(int(pid)) == start != ""


# ---- the study state file: what --resume trusts ------------------------------------------------------------

def resume_fields(spec: StudySpec) -> dict[str, str]:
    """The flattened spec `--resume` compares (every field but RESUME_FREE_FIELDS)."""
    flat = layout.flatten(spec.model_dump(mode="json"))
    return {key: value for key, value in flat.items() if key not in RESUME_FREE_FIELDS}


def spec_digest(fields: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def state_path(storage: str, study: str) -> str:
    return f"{storage.rstrip('/')}/{study}{STATE_SUFFIX}"


def new_ray_folder(study: str) -> str:
    """A fresh Ray experiment folder name: two starts of one study in the same second still get two."""
    return f"{study}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def write_study_state(storage: str, spec: StudySpec, ray_folder: str, parent_run_id: str) -> None:
    """`<storage>/<study>.study.json`: this start's Ray folder, parent run and spec (atomically replaced)."""
    fields = resume_fields(spec)
    state = {"study": spec.name, "ray_folder": ray_folder, "parent_run_id": parent_run_id,
             "spec_hash": spec_digest(fields), "spec": fields}
    text = json.dumps(state, indent=1, sort_keys=True)
    path = state_path(storage, spec.name)
    if "://" not in storage:
        write_text_atomically(path, text)
        return
    filesystem, fs_path = pyarrow.fs.FileSystem.from_uri(path)
    with filesystem.open_output_stream(fs_path) as stream:  # an object store replaces an object whole
        stream.write(text.encode())


def read_study_state(storage: str, study: str) -> dict[str, Any] | None:
    """The state file of the study's latest start in this storage, checked; None when there is none.

    StudyError when it is unreadable or names a Ray folder that is not one this driver makes, under this
    storage: `--resume` unpickles what is in that folder, so only a folder of our own may be named."""
    path = state_path(storage, study)
    shown = redacted(path)
    try:
        if "://" in storage:
            filesystem, fs_path = pyarrow.fs.FileSystem.from_uri(path)
            with filesystem.open_input_stream(fs_path) as stream:
                text = stream.read().decode()
        else:
            text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StudyError(f"--resume: cannot read {shown} ({exc})") from None
    try:
        state = json.loads(text)
        folder, parent, spec = state["ray_folder"], state["parent_run_id"], state["spec"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StudyError(f"--resume: {shown} is not a study state file ({exc})") from None
    if not (isinstance(folder, str) and RAY_FOLDER.fullmatch(folder) and folder.startswith(f"{study}-")):
        raise StudyError(f"--resume: {shown} names Ray folder {folder!r}, not one of study {study!r}")
    if not (isinstance(parent, str) and re.fullmatch(r"[0-9a-f]{32}", parent) and isinstance(spec, dict)):
        raise StudyError(f"--resume: {shown} is not a study state file (parent run {parent!r})")
    if "://" not in storage:  # a symlink may not lead out of the storage root
        root, experiment = Path(storage).resolve(), (Path(storage) / folder).resolve()
        if not experiment.is_relative_to(root):
            raise StudyError(f"--resume: Ray folder {Path(storage) / folder} leads out of storage {root}")
    return state


# ---- MLflow calls that wait out an outage of the tracking server -------------------------------------------

class TrackingOutage(RuntimeError):
    """The tracking server did not answer /health within `tracking.outage_wait_s`."""


def is_outage(exc: BaseException) -> bool:
    """What an unreachable or overloaded server gives: a connection error, a timeout, HTTP 5xx or 429."""
    if isinstance(exc, MlflowException):
        return exc.error_code in OUTAGE_ERROR_CODES
    return isinstance(exc, requests.RequestException | ConnectionError | TimeoutError)


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class TrackingGuard:
    """Calls MLflow, waiting out an outage of an HTTP tracking server instead of failing at once.

    A call that fails the way calls to an unreachable or overloaded server fail (`is_outage`) is repeated once
    the server answers /health again, polled every HEALTH_POLL_S seconds for up to `wait_s` seconds in all
    (then TrackingOutage). An error of a server that answers /health, twice in a row, and any other error are
    raised at once. Other tracking URIs (sqlite, a database) are called once. The calls repeated are
    idempotent: a metric batch logged twice is stored once (same keys, steps, timestamps), a run is created
    once per key (`create_run_once`).
    """

    def __init__(self, uri: str, wait_s: float = 0.0, say: Callable[[str], None] = print_to_stderr):
        self.uri = uri
        self.wait_s = wait_s
        self.http = uri.startswith(("http://", "https://")) and wait_s > 0
        self.say = say

    def __call__(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        deadline = None
        answered = 0  # failures in a row while the server answers /health: not an outage
        while True:
            try:
                return call(*args, **kwargs)
            except Exception as exc:
                if not (self.http and is_outage(exc)):
                    raise
                if deadline is None:
                    deadline = time.monotonic() + self.wait_s
                if server_healthy(self.uri, timeout=HEALTH_POLL_S):
                    answered += 1
                    if answered >= 2:
                        raise
                    continue
                answered = 0
                left = max(0.0, deadline - time.monotonic())
                self.say(f"tracking server {redacted(self.uri)} unreachable: waiting up to {left:.0f} s for "
                         "its /health (tracking.outage_wait_s)")
                while not server_healthy(self.uri, timeout=HEALTH_POLL_S):
                    if time.monotonic() >= deadline:
                        raise TrackingOutage(
                            f"tracking server {redacted(self.uri)} did not answer /health within "
                            f"{self.wait_s:g} s (tracking.outage_wait_s): {redacted(str(exc))}") from None
                    time.sleep(HEALTH_POLL_S)


NO_WAIT = TrackingGuard("", 0.0)  # calls once: for tests and tools that talk to MLflow directly


class TrialRun:
    """The MLflow child run of one trial: logs each report once, however often the trial is resumed.

    Every call goes through the trial's TrackingGuard (an outage of the server is waited out).
    """

    def __init__(self, client: MlflowClient, run_id: str, guard: TrackingGuard = NO_WAIT):
        self.client = client
        self.run_id = run_id
        self.guard = guard
        recorded = guard(client.get_run, run_id)
        # Steps already logged (a crashed attempt may have logged past its last checkpoint): never log twice.
        self.last_step = int(recorded.data.metrics.get("iteration", -1))
        tags = recorded.data.tags
        # The trial's own final report, when it has already ended (see `final_result`); a deterministic
        # failure is final too: the trial would fail the same way again.
        self.ended = tags.get(layout.STATUS_TAG) in layout.ENDED_STATUSES or (
            tags.get(layout.FAILURE_TAG) == layout.DETERMINISTIC_FAILURE)
        self.running = recorded.info.status == "RUNNING" and tags.get(layout.STATUS_TAG) == layout.RUNNING
        self._recorded = recorded.data
        self.logged_artifacts: dict[str, float] = {}  # path relative to workdir -> mtime when logged
        self.log_seconds = 0.0  # time spent talking to MLflow (the service's overhead)

    @classmethod
    def open(cls, client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str,
             run_name: str, tags: dict[str, str], params: dict[str, str],
             datasets: Iterable[DatasetInput] = (), guard: TrackingGuard = NO_WAIT) -> TrialRun:
        """Continue the run of the trial (tags cell, seed) under the parent, else create it (once) with its
        params and its dataset inputs."""
        started = time.perf_counter()
        key = layout.trial_run_key(parent_run_id, tags[layout.CELL_TAG], tags[layout.SEED_TAG])
        all_tags = {layout.PARENT_RUN_ID_TAG: parent_run_id, layout.ROLE_TAG: layout.TRIAL_ROLE,
                    layout.TRIAL_ID_TAG: trial_id, layout.STATUS_TAG: layout.RUNNING,
                    layout.DIVERGED_TAG: "0", layout.DIVERGENCE_CAUSE_TAG: "",
                    layout.DIVERGENCE_STEP_TAG: "-1", **tags}
        run_id = guard(create_run_once, client, experiment_id, key, run_name, all_tags)
        run = cls(client, run_id, guard)
        if not run.params:  # new (or its creator died before logging them)
            guard(log_params, client, run_id, params)
            guard(log_inputs, client, run_id, list(datasets))
            run._recorded.params.update(params)
        if not run.ended and not run.running:  # an ended run stays as it was: never reopened or closed twice
            guard(client.update_run, run_id, status="RUNNING")
            guard(client.set_tag, run_id, layout.STATUS_TAG, layout.RUNNING)
            run.running = True
        run.log_seconds += time.perf_counter() - started
        return run

    @property
    def params(self) -> dict[str, str]:
        return self._recorded.params

    def differing_params(self, params: dict[str, str]) -> list[str]:
        """Keys whose value differs between the run's recorded params and `params` (either side missing)."""
        recorded = self.params
        return sorted(key for key in set(params) | set(recorded) if recorded.get(key) != params.get(key))

    def final_result(self) -> dict[str, Any]:
        """What an ended trial reported last (latest value of each metric, its divergence tags; `failed` 1
        for a deterministic failure).

        A driver killed just after a trial ended may restore it from an older snapshot of Tune's state; the
        trial then hands Tune this instead of training again.
        """
        tags, metrics = self._recorded.tags, self._recorded.metrics
        result = {**metrics, "iteration": int(metrics.get("iteration", 0)), "outcome": layout.outcome(tags),
                  "divergence_cause": tags.get(layout.DIVERGENCE_CAUSE_TAG, ""),
                  "divergence_step": int(tags.get(layout.DIVERGENCE_STEP_TAG, -1))}
        if tags.get(layout.FAILURE_TAG) == layout.DETERMINISTIC_FAILURE:
            result |= {"failed": 1, "error": tags.get(layout.ERROR_TAG, "")}
        return result

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
            self.guard(self.client.log_batch, self.run_id, metrics=items[start:start + MAX_METRICS_PER_BATCH])
        self.last_step = step
        self.log_seconds += time.perf_counter() - started
        return True

    def log_resume(self, iteration: int) -> None:
        """Record that this attempt starts from the checkpoint of `iteration` (RESUMED_FROM at that step)."""
        metric = Metric(layout.RESUMED_FROM, float(iteration), int(time.time() * 1000), iteration)
        self.guard(self.client.log_batch, self.run_id, metrics=[metric])

    def log_new_artifacts(self, workdir: Path, paths: Iterable[Path]) -> None:
        """Upload the files that are new or changed since they were last logged (samples, events.json)."""
        started = time.perf_counter()
        for path in paths:
            relative = path.relative_to(workdir)
            mtime = path.stat().st_mtime
            if self.logged_artifacts.get(str(relative)) == mtime:
                continue
            folder = str(relative.parent) if str(relative.parent) != "." else None
            self.guard(self.client.log_artifact, self.run_id, str(path), folder)
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
        self.guard(self.client.log_batch, self.run_id, tags=[RunTag(key, val) for key, val in tags.items()])
        self.guard(self.client.set_terminated, self.run_id, layout.MLFLOW_END_STATUS[status])
        self.ended = True
        self.log_seconds += time.perf_counter() - started

    def fail(self, message: str, details: str) -> None:
        """End the run FAILED by a deterministic error: the message as ERROR_TAG, `details` (the message and
        its traceback) as ERROR_ARTIFACT; final, so the trial is never retried (`ended`)."""
        started = time.perf_counter()
        tags = {layout.STATUS_TAG: layout.FAILED, layout.FAILURE_TAG: layout.DETERMINISTIC_FAILURE,
                layout.OUTCOME_TAG: layout.FAILED, layout.ERROR_TAG: message[:layout.MAX_TAG_CHARS]}
        self.guard(self.client.log_batch, self.run_id, tags=[RunTag(key, val) for key, val in tags.items()])
        self.guard(self.client.log_text, self.run_id, details, layout.ERROR_ARTIFACT)
        self.guard(self.client.set_terminated, self.run_id, layout.MLFLOW_END_STATUS[layout.FAILED])
        self._recorded.tags.update(tags)
        self.ended = True
        self.log_seconds += time.perf_counter() - started
