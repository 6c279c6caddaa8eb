"""The MLflow layout of a study: every name that study/ writes and analysis/ reads, defined once here.

One experiment per study (`tracking.experiment`, else the study's name), tagged EXPERIMENT_KIND_TAG =
EXPERIMENT_KIND so that MLflow's UI opens it on its training runs (not on the GenAI overview), holding:
- the study's parent run, named after the study. Tags: ROLE_TAG = STUDY_ROLE, STUDY_TAG, PRESET_TAG,
  GIT_COMMIT_TAG, AXES_TAG (the swept axes, comma-separated, `seed` last), STATUS_TAG (one of STUDY_STATUSES),
  RAY_EXPERIMENT_TAG (where the Ray Tune experiment is, for people: `--resume` never reads it), SPEC_HASH_TAG,
  DRIVER_TAG (the driver process: `host:pid:start`), RUN_KEY_TAG, VERSION_TAG_PREFIX + each package,
  SOURCE_NAME_TAG. Params: the spec, `flatten`ed, credentials in URIs redacted. Artifacts: SPEC_ARTIFACT; the
  analysis report under REPORT_ARTIFACT_PATH.
- one child run per trial (a pack's member too), named `trial_run_name` (variant first). Tags:
  PARENT_RUN_ID_TAG, ROLE_TAG = TRIAL_ROLE, STUDY_TAG, TRIAL_ID_TAG, CELL_TAG (`cell_key` of the trial's
  axes), SEED_TAG, STATUS_TAG (one of TRIAL_STATUSES), OUTCOME_TAG (one of OUTCOMES, once ended; see
  `outcome`), DIVERGED_TAG ("0" or "1"), DIVERGENCE_CAUSE_TAG, DIVERGENCE_STEP_TAG, NODE_ID_TAG, GPU_IDS_TAG,
  RESOURCES_TAG, TORCH_THREADS_TAG; a pack's member also PACK_TAG (its Ray trial id) and PACK_MEMBER_TAG
  (its index); a trial ASHA stopped STOPPED_EARLY_TAG = "1"; METRIC_TAG (the name of its primary metric);
  SOURCE_NAME_TAG; RUN_KEY_TAG (`trial_run_key`: the one run of a (parent, cell, seed), however often its
  creation is retried); a failed trial ERROR_TAG (the message) and FAILURE_TAG (DETERMINISTIC_FAILURE: it
  fails every time and is never retried; RETRIES_SPENT: Ray's retries ran out).
  Params: the TrialConfig, `flatten`ed. Input: its dataset (name and resolution, context DATASET_CONTEXT).
  Metrics: each report of the trial (trainables/train.py) under its keys, at step = its `iteration`, and the
  primary metric's value once more as PRIMARY_METRIC (one column for every study, FID or a surrogate), and
  RESUMED_FROM once per attempt restored from a checkpoint (a retry, a `--resume`).
  Artifacts: the files of the trial's folder matching SAMPLES_PATTERN, EVENTS_ARTIFACT (the divergence
  events, a JSON list) and, failed, ERROR_ARTIFACT (the error and its traceback).

Plain Python (no MLflow, Ray or torch), so that the reader, the writer and the tests share it freely.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from trainables.config import TRIAL_OUTCOMES

# The experiment's kind (the tag and value MLflow 3.17's UI reads, mlflow/server/js): a model-training
# experiment, whose page is its runs table. The 3.17 UI's GenAI / Model training switch (localStorage, or the
# URL's workflowType) decides first, so `review_path` sets it too.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A view of the runs table saved on the experiment (the UI's shared views: `review_view`, opened by
# `review_path`): the trials and the columns a reviewer reads.
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
REVIEW_VIEW = "review"
WORKFLOW_TYPE = "machine_learning"  # the UI switch's "Model training"

# Tags of both kinds of run
ROLE_TAG = "role"  # what a run is: STUDY_ROLE or TRIAL_ROLE
STUDY_TAG = "study"  # the study's name
STATUS_TAG = "status"  # STUDY_STATUSES on the parent, TRIAL_STATUSES on a trial
SOURCE_NAME_TAG = "mlflow.source.name"  # MLflow's own: the runs table's Source column
SOURCE_NAME = "study/run.py"
# Tags of the parent run
PRESET_TAG = "preset"  # the preset's name, "" for a spec file
GIT_COMMIT_TAG = "git_commit"  # HEAD's commit, `+dirty` with uncommitted changes
AXES_TAG = "axes"
RAY_EXPERIMENT_TAG = "ray_experiment"
SPEC_HASH_TAG = "spec_hash"  # sha256 of the spec `--resume` compares (study/run.py)
DRIVER_TAG = "driver"  # `host:pid:start ticks` of the driver process: a later start tells a dead one
RUN_KEY_TAG = "run_key"  # a client-side key: the run a retried create_run made twice is found and kept once
VERSION_TAG_PREFIX = "version."  # `version.torch` ...: the version of each package that ran the study
# Tags of a trial's run
PARENT_RUN_ID_TAG = "mlflow.parentRunId"  # MLflow's own: nests the run under the study's
TRIAL_ID_TAG = "trial_id"  # Ray Tune's trial id (a pack's member: `<pack's trial id>_<member>`)
CELL_TAG = "cell"
SEED_TAG = "seed"
OUTCOME_TAG = "outcome"  # the trial's verdict, one of OUTCOMES; absent while it runs (see `outcome`)
DIVERGED_TAG = "diverged"
DIVERGENCE_CAUSE_TAG = "divergence_cause"  # one of trainables.config.DIVERGENCE_CAUSES, "" when none
DIVERGENCE_STEP_TAG = "divergence_step"  # generator iteration, "-1" when none
NODE_ID_TAG = "node_id"  # where Ray placed the trial
GPU_IDS_TAG = "gpu_ids"
TORCH_THREADS_TAG = "torch_threads"  # the trial's torch CPU threads (its CPU share): a CPU run repeats at it
RESOURCES_TAG = "resources"  # what Ray gave it, as JSON: {"CPU": 1.0, "GPU": 0.25}
PACK_TAG = "pack"
PACK_MEMBER_TAG = "pack_member"
STOPPED_EARLY_TAG = "stopped_early"
METRIC_TAG = "metric"  # the name of the trial's primary metric: fid, kid or a surrogate such as fd_digits
ERROR_TAG = "error"  # a failed trial's error message (the first MAX_TAG_CHARS characters)
FAILURE_TAG = "failure"  # why a trial failed: DETERMINISTIC_FAILURE or RETRIES_SPENT

# Metrics of a trial's run besides the trial's own report keys
PRIMARY_METRIC = "primary_metric"  # the value of METRIC_TAG's metric at each evaluation
RESUMED_FROM = "resumed_from"  # an attempt restored from a checkpoint: its iteration, at that step
DATASET_CONTEXT = "training"  # the context of a trial's dataset input (MLflow's mlflow.data.context)

STUDY_ROLE = "study"
TRIAL_ROLE = "trial"

# Values of STATUS_TAG
RUNNING = "running"
FINISHED = "finished"
DIVERGED = "diverged"  # ended on a divergence: a result, not a failure
FAILED = "failed"
KILLED = "killed"  # cut off by its driver's end (Ctrl+C, a crash, SIGKILL): `--resume` continues it
TRIAL_STATUSES = (RUNNING, FINISHED, DIVERGED, FAILED, KILLED)
ENDED_STATUSES = (FINISHED, DIVERGED)  # set by the trial itself (or ASHA's stop): its result stands
STUDY_STATUSES = (RUNNING, FINISHED, FAILED, KILLED)
# Values of OUTCOME_TAG (README: Outcomes): a trial's own verdict in its final report (trainables.config's
# TRIAL_OUTCOMES: stable, diverged, collapsed, no_learning), or FAILED, written on the failure paths.
STABLE, COLLAPSED, NO_LEARNING = (TRIAL_OUTCOMES[i] for i in (0, 2, 3))  # [1] is DIVERGED, the status's
OUTCOMES = (*TRIAL_OUTCOMES, FAILED)
# The MLflow run status each ended status closes its run with.
MLFLOW_END_STATUS = {FINISHED: "FINISHED", DIVERGED: "FINISHED", FAILED: "FAILED", KILLED: "KILLED"}
# Values of FAILURE_TAG
DETERMINISTIC_FAILURE = "deterministic"  # bad config, data or weights: fails every time, never retried
RETRIES_SPENT = "retries_spent"  # Ray retried it max_failures times
MAX_TAG_CHARS = 8000  # MLflow's limit on a tag value: a longer message is cut there (whole in ERROR_ARTIFACT)

# Artifacts
SPEC_ARTIFACT = "spec.yaml"  # the parent's validated spec
REPORT_ARTIFACT_PATH = "analysis"  # the parent's report, tables and figures (analysis/report.py)
EVENTS_ARTIFACT = "events.json"  # a trial's divergence events, as its folder holds them
ERROR_ARTIFACT = "error.txt"  # a failed trial's error message and traceback
SAMPLES_PATTERN = "samples/iter_*.png"  # a trial's sample grids, one per evaluation


def outcome(tags: Mapping[str, str], mlflow_status: str = "FINISHED") -> str:
    """A trial run's outcome (one of OUTCOMES), or RUNNING while it has none, from its tags and MLflow state.

    OUTCOME_TAG when set. Else (a run ASHA stopped early, or one written before outcomes were tagged): FAILED
    for a failed run, RUNNING for one not ended (a killed one too: `--resume` continues it), else DIVERGED or
    STABLE as DIVERGED_TAG says."""
    if tags.get(OUTCOME_TAG) in OUTCOMES:
        return tags[OUTCOME_TAG]
    status = tags.get(STATUS_TAG)
    if mlflow_status == "FAILED" or status == FAILED:
        return FAILED
    if status in (RUNNING, KILLED) or (status not in ENDED_STATUSES and mlflow_status != "FINISHED"):
        return RUNNING
    return DIVERGED if tags.get(DIVERGED_TAG) == "1" else STABLE


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested values as MLflow params: dotted keys, strings kept, every other value as JSON.

    {'divergence': {'grad_explosion': 1e4}, 'metrics': ['fid']} -> {'divergence.grad_explosion': '10000.0',
    'metrics': '["fid"]'}; an empty mapping stays one param ('{}').
    """
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return flat


def cell_key(point: dict[str, Any]) -> str:
    """A stable key of a trial's axes except the seed: `g_lr=0.0002,variant=sn` (names sorted)."""
    return ",".join(f"{name}={point[name]}" for name in sorted(point) if name != "seed")


def parse_cell(cell: str) -> dict[str, str]:
    """The axes of a CELL_TAG, values as written: 'beta1=0.5,lr=1e-3' -> {'beta1': '0.5', 'lr': '1e-3'}."""
    return dict(part.split("=", 1) for part in cell.split(",") if "=" in part)


def trial_run_key(parent_run_id: str, cell: str, seed: int | str) -> str:
    """RUN_KEY_TAG of a trial's run: its identity (parent run, cell, seed) as 32 hex digits."""
    return hashlib.sha256(f"{parent_run_id}\0{cell}\0{seed}".encode()).hexdigest()[:32]


def trial_run_name(point: dict[str, Any], seed: int | str, variant: str) -> str:
    """The run name of a trial, the variant first (MLflow's runs table cuts long names): its variant (the
    point's label when variant is swept, else the trial's `variant`), then the other swept values in the
    spec's order, then the seed: {'lr': '1e-3', 'beta1': 0.5, 'variant': 'bssn'} -> `bssn lr=1e-3 beta1=0.5
    seed=0`."""
    values = [f"{name}={_short(value)}" for name, value in point.items() if name not in ("variant", "seed")]
    return " ".join([str(point.get("variant", variant)), *values, f"seed={seed}"])


def _short(value: Any) -> str:
    """A swept value as a run name shows it: floats to 4 significant digits (a search draws 17)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def review_view(swept_params: list[str]) -> dict[str, Any]:
    """The runs table a reviewer opens (MLflow 3.17 UI's shared view state): the study's trial runs, sorted
    by PRIMARY_METRIC (lower is better), with the swept params (`variant` first) and the outcome, status,
    divergence and metric columns; every other column (Dataset, Source and the 180 others) stays a click
    away."""
    columns = [f"params.`{name}`" for name in dict.fromkeys(["variant", *swept_params])]
    columns += [f"tags.`{name}`" for name in (OUTCOME_TAG, STATUS_TAG, DIVERGENCE_CAUSE_TAG,
                                             DIVERGENCE_STEP_TAG, METRIC_TAG)]
    columns += [f"metrics.`{name}`" for name in (PRIMARY_METRIC, "iteration")]
    # columnOrder: in this order, before the rest (else the UI sorts each group's columns by name)
    return {"searchFilter": tag_filter({ROLE_TAG: TRIAL_ROLE}), "orderByKey": f"metrics.`{PRIMARY_METRIC}`",
            "orderByAsc": True, "selectedColumns": columns, "columnOrder": columns}


def review_path(experiment_id: str) -> str:
    """The UI path (after the server's address) of the experiment's review view, as Model training."""
    return (f"/#/experiments/{experiment_id}/runs?workflowType={WORKFLOW_TYPE}"
            f"&viewStateShareKey={REVIEW_VIEW}")


def tag_filter(tags: dict[str, str]) -> str:
    """An MLflow search filter for the runs carrying every one of these tag values.

    {ROLE_TAG: STUDY_ROLE, STUDY_TAG: "default"} -> "tags.`role` = 'study' AND tags.`study` = 'default'".
    MLflow's filters have no escape: a value holding `'` is written in double quotes; one holding both quote
    characters cannot be searched for (ValueError).
    """
    return " AND ".join(f"tags.`{key}` = {_quoted(str(value))}" for key, value in tags.items())


def _quoted(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot search MLflow for a tag value holding both quote characters: {value!r}")
