"""The thin Ray Tune adapter: one Tune trial runs trainables' `train()` and mirrors its reports to MLflow.

Every report goes to MLflow (step = iteration); only the reports that carry `objective` (evaluations and the
final report) go to Tune, so ASHA and Optuna only ever see finite values. Checkpoints are Tune checkpoints of
train's `workdir/checkpoint/` folder with the MLflow run id added, so a resumed trial continues its run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.search.repeater import TRIAL_INDEX

from study.spec import StudySpec, cell_key, trial_config
from study.tracking import TrialRun, flatten
from trainables.config import TrialConfig
from trainables.train import train

RUN_ID_FILE = "mlflow_run_id"  # written into each checkpoint folder
ARTIFACT_PATTERNS = ("samples/iter_*.png", "events.json")
PATH_FIELDS = ("data_root", "cache_dir", "inception_weights")  # resolved against the driver's folder


@dataclass(frozen=True)
class StudyContext:
    """What every trial of a study needs from the driver (small: it travels with each trial)."""

    spec: dict[str, Any]  # StudySpec.model_dump(mode="json")
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    cwd: str  # the driver's working folder: relative paths of the spec are relative to it


def trial_point(spec: StudySpec, config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(point, seed) of a Tune config: a grid gives both; a search gives the point and the repeat index."""
    point = dict(config["point"])
    seed = config["seed"] if "seed" in config else spec.seeds[config[TRIAL_INDEX]]
    return point, seed


def absolute_paths(config: TrialConfig, cwd: Path) -> TrialConfig:
    """Ray runs a trial in its own folder: make the config's relative paths relative to the driver's."""
    updates = {}
    for field in PATH_FIELDS:
        value = getattr(config, field)
        if value is not None and not Path(value).expanduser().is_absolute():
            updates[field] = str(cwd / value)
    return config.model_copy(update=updates)


def run_trial(config: dict[str, Any], context: StudyContext) -> None:
    """The Tune function trainable: build the TrialConfig, open its MLflow run, train, report."""
    spec = StudySpec.model_validate(context.spec)
    point, seed = trial_point(spec, config)
    trial = absolute_paths(trial_config(spec, point, seed), Path(context.cwd))
    tune_context = tune.get_context()
    trial_id = tune_context.get_trial_id()
    workdir = Path(tune_context.get_trial_dir()) / "work"

    resume_from, run_id = None, None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume_from = Path(checkpoint.to_directory(str(workdir / "resume")))
        run_id_file = resume_from / RUN_ID_FILE
        run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None

    cell = cell_key(point)
    # Where Ray placed the trial: the node and the GPUs it was given (fractional trials share one).
    placement = {"node_id": ray.get_runtime_context().get_node_id(),
                 "gpu_ids": ",".join(str(gpu) for gpu in ray.get_gpu_ids())}
    tags = {"study": spec.name, "cell": cell, "seed": str(seed), **placement}
    run = TrialRun.open(MlflowClient(context.tracking_uri), context.experiment_id, context.parent_run_id,
                        trial_id, run_id, run_name=f"{cell},seed={seed}" if cell else f"seed={seed}",
                        tags=tags, params=flatten(trial.model_dump(mode="json")))
    if run.ended:
        tune.report({**run.final_result(), "mlflow_seconds": run.log_seconds})
        return

    def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        run.log_report(metrics)
        if "objective" in metrics or checkpoint_dir is not None:  # evaluations write sample grids
            run.log_new_artifacts(workdir, sorted(path for pattern in ARTIFACT_PATTERNS
                                                  for path in workdir.glob(pattern)))
        if metrics.get("done"):  # before tune.report: Tune may end the actor once it has the last result
            run.finish(metrics)
        if checkpoint_dir is not None:
            (Path(checkpoint_dir) / RUN_ID_FILE).write_text(run.run_id)
        if "objective" not in metrics:
            return
        result = {key: value for key, value in metrics.items() if key != "done"}  # `done` ends a Tune trial
        result["mlflow_seconds"] = run.log_seconds
        tune_checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(result, checkpoint=tune_checkpoint)

    train(trial, report, workdir=workdir, resume_from=resume_from)
