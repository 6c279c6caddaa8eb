"""The MLflow layout of a study: every name that study/ writes and analysis/ reads, defined once here.

One experiment per study (`tracking.experiment`, else the study's name), holding:
- the study's parent run, named after the study. Tags: ROLE_TAG = STUDY_ROLE, STUDY_TAG, PRESET_TAG,
  GIT_COMMIT_TAG, AXES_TAG (the swept axes, comma-separated, `seed` last), STATUS_TAG (one of STUDY_STATUSES),
  RAY_EXPERIMENT_TAG (the Ray Tune experiment's path, which `--resume` restores), VERSION_TAG_PREFIX + each
  package. Params: the spec, `flatten`ed. Artifacts: SPEC_ARTIFACT; the analysis report under
  REPORT_ARTIFACT_PATH.
- one child run per trial (a pack's member too), named `trial_run_name`. Tags: PARENT_RUN_ID_TAG,
  ROLE_TAG = TRIAL_ROLE, STUDY_TAG, TRIAL_ID_TAG, CELL_TAG (`cell_key` of the trial's axes), SEED_TAG,
  STATUS_TAG (one of TRIAL_STATUSES), OUTCOME_TAG (one of OUTCOMES, once ended), DIVERGED_TAG ("0" or "1"),
  DIVERGENCE_CAUSE_TAG, DIVERGENCE_STEP_TAG, NODE_ID_TAG, GPU_IDS_TAG, RESOURCES_TAG; a pack's member also
  PACK_TAG (its Ray trial id) and PACK_MEMBER_TAG (its index); a trial ASHA stopped STOPPED_EARLY_TAG = "1".
  Params: the TrialConfig, `flatten`ed. Metrics: each report of the trial (trainables/train.py) under its
  keys, at step = its `iteration`. Artifacts: the files of the trial's folder matching SAMPLES_PATTERN, and
  EVENTS_ARTIFACT (the divergence events, a JSON list).

Plain Python (no MLflow, Ray or torch), so that the reader, the writer and the tests share it freely.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from trainables.config import TRIAL_OUTCOMES

# Tags of both kinds of run
ROLE_TAG = "role"  # what a run is: STUDY_ROLE or TRIAL_ROLE
STUDY_TAG = "study"  # the study's name
STATUS_TAG = "status"  # STUDY_STATUSES on the parent, TRIAL_STATUSES on a trial
# Tags of the parent run
PRESET_TAG = "preset"  # the preset's name, "" for a spec file
GIT_COMMIT_TAG = "git_commit"  # HEAD's commit, `+dirty` with uncommitted changes
AXES_TAG = "axes"
RAY_EXPERIMENT_TAG = "ray_experiment"
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
RESOURCES_TAG = "resources"  # what Ray gave it, as JSON: {"CPU": 1.0, "GPU": 0.25}
PACK_TAG = "pack"
PACK_MEMBER_TAG = "pack_member"
STOPPED_EARLY_TAG = "stopped_early"

STUDY_ROLE = "study"
TRIAL_ROLE = "trial"

# Values of STATUS_TAG
RUNNING = "running"
FINISHED = "finished"
DIVERGED = "diverged"  # ended on a divergence: a result, not a failure
FAILED = "failed"
TRIAL_STATUSES = (RUNNING, FINISHED, DIVERGED, FAILED)
ENDED_STATUSES = (FINISHED, DIVERGED)  # set by the trial itself (or ASHA's stop): its result stands
STUDY_STATUSES = (RUNNING, FINISHED, FAILED)
# Values of OUTCOME_TAG (README: Outcomes): a trial's own verdict in its final report (trainables.config's
# TRIAL_OUTCOMES: stable, diverged, collapsed, no_learning), or FAILED, written on the failure path.
STABLE, COLLAPSED, NO_LEARNING = (TRIAL_OUTCOMES[i] for i in (0, 2, 3))  # [1] is DIVERGED, the status's
OUTCOMES = (*TRIAL_OUTCOMES, FAILED)
# The MLflow run status each ended status closes its run with.
MLFLOW_END_STATUS = {FINISHED: "FINISHED", DIVERGED: "FINISHED", FAILED: "FAILED"}

# Artifacts
SPEC_ARTIFACT = "spec.yaml"  # the parent's validated spec
REPORT_ARTIFACT_PATH = "analysis"  # the parent's report, tables and figures (analysis/report.py)
EVENTS_ARTIFACT = "events.json"  # a trial's divergence events, as its folder holds them
SAMPLES_PATTERN = "samples/iter_*.png"  # a trial's sample grids, one per evaluation


def outcome(tags: Mapping[str, str], mlflow_status: str = "FINISHED") -> str:
    """A trial run's outcome (one of OUTCOMES), or RUNNING while it has none, from its tags and MLflow state.

    OUTCOME_TAG when set. Else (a run ASHA stopped early, or one written before outcomes were tagged): FAILED
    for a failed or killed run, RUNNING for one not ended, else DIVERGED or STABLE as DIVERGED_TAG says."""
    if tags.get(OUTCOME_TAG) in OUTCOMES:
        return tags[OUTCOME_TAG]
    status = tags.get(STATUS_TAG)
    if mlflow_status in ("FAILED", "KILLED") or status == FAILED:
        return FAILED
    if status == RUNNING or (status not in ENDED_STATUSES and mlflow_status != "FINISHED"):
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


def trial_run_name(cell: str, seed: int | str) -> str:
    """The run name of a trial: its cell and seed, `g_lr=0.0002,variant=sn,seed=0`."""
    return f"{cell},seed={seed}" if cell else f"seed={seed}"


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
