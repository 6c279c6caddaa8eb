"""The thin Ray Tune adapter: one Tune trial runs trainables' `train()` and mirrors its reports to MLflow.

Every report goes to MLflow (step = iteration); only the reports that carry `objective` (evaluations and the
final report) go to Tune, so ASHA and Optuna only ever see finite values. Checkpoints are Tune checkpoints of
train's `workdir/checkpoint/` folder; a resumed trial finds its MLflow run by its cell and seed.
A pack (`pack_size` > 1) is one Tune trial running `train_pack()`: each member reports to its own MLflow run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from ray import tune
from ray.tune.search.repeater import TRIAL_INDEX

from study import layout
from study.spec import StudySpec, trial_config
from study.tracking import TrialRun
from trainables.config import TrialConfig
from trainables.metrics.reference import BUILTIN_LOCATIONS, data_location
from trainables.packing import member_name, train_pack
from trainables.train import train

ARTIFACT_PATTERNS = (layout.SAMPLES_PATTERN, layout.EVENTS_ARTIFACT)  # in the trial's folder
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
    """The Tune function trainable: one trial, or one pack of trials (`pack_size`), trained and reported."""
    spec = StudySpec.model_validate(context.spec)
    if "pack" in config:
        members = [(member["point"], member["seed"]) for member in config["pack"]]
        if len(members) > 1:
            run_pack(spec, members, context)
            return
        [(point, seed)] = members
    else:
        point, seed = trial_point(spec, config)
    trial = absolute_paths(trial_config(spec, point, seed), Path(context.cwd))
    tune_context = tune.get_context()
    trial_id = tune_context.get_trial_id()
    workdir = Path(tune_context.get_trial_dir()) / "work"

    resume_from = restored_checkpoint(workdir)
    run = open_trial_run(spec, context, trial, point, seed, trial_id)
    if run.ended:
        tune.report({**run.final_result(), "mlflow_seconds": run.log_seconds})
        return

    def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        log_to_run(run, workdir, metrics, checkpoint_dir, trial.primary_metric)
        if "objective" not in metrics:
            return
        result = {key: value for key, value in metrics.items() if key != "done"}  # `done` ends a Tune trial
        result["mlflow_seconds"] = run.log_seconds
        tune_checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(result, checkpoint=tune_checkpoint)

    train(trial, report, workdir=workdir, resume_from=resume_from)


def run_pack(spec: StudySpec, members: list[tuple[dict[str, Any], int]], context: StudyContext) -> None:
    """K trials as one Tune trial (trainables/packing.py): each member its own MLflow run, Tune sees the pack.

    Member k's run has trial_id `<Tune trial id>_<k>` and tags `pack` (the Tune trial id) and `pack_member`.
    Tune gets the pack's results: iteration, it_per_s summed over the active members, the best member
    objective, `diverged` (members diverged so far), `members_ended`, and the pack checkpoint.
    """
    trials = [absolute_paths(trial_config(spec, point, seed), Path(context.cwd)) for point, seed in members]
    tune_context = tune.get_context()
    trial_id = tune_context.get_trial_id()
    workdir = Path(tune_context.get_trial_dir()) / "work"
    resume_from = restored_checkpoint(workdir)
    runs = [open_trial_run(spec, context, trial, point, seed, f"{trial_id}_{k}",
                           pack_tags={layout.PACK_TAG: trial_id, layout.PACK_MEMBER_TAG: str(k)})
            for k, (trial, (point, seed)) in enumerate(zip(trials, members, strict=True))]
    recorded = {k: run.final_result() for k, run in enumerate(runs) if run.ended}  # members ended before
    objectives = {k: result["objective"] for k, result in recorded.items() if "objective" in result}
    diverged = {k for k, result in recorded.items() if result.get("diverged")}
    evaluated: list[int] = []  # members that reported an objective at the current logging step

    def pack_result(metrics: dict[str, Any]) -> dict[str, Any]:
        return {**metrics, "objective": min(objectives.values()), "diverged": len(diverged),
                "members_ended": sum(run.ended for run in runs),
                "mlflow_seconds": sum(run.log_seconds for run in runs)}

    if len(recorded) == len(runs):
        iteration = max(result["iteration"] for result in recorded.values())
        tune.report(pack_result({"iteration": iteration, "pack_size": len(runs)}))
        return

    def member_report(k: int) -> Callable[..., None]:
        def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
            log_to_run(runs[k], workdir / member_name(k), metrics, checkpoint_dir, trials[k].primary_metric)
            if "objective" in metrics:
                objectives[k] = metrics["objective"]
                evaluated.append(k)
            if metrics.get("diverged"):
                diverged.add(k)
        return report

    def pack_report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        # Only results with an objective reach Tune (a checkpoint step is an evaluation step: validate_study).
        if objectives and (evaluated or checkpoint_dir is not None):
            tune_checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            tune.report(pack_result(metrics), checkpoint=tune_checkpoint)
        evaluated.clear()

    train_pack(trials, [member_report(k) for k in range(len(runs))], workdir=workdir,
               resume_from=resume_from, pack_report=pack_report)


def restored_checkpoint(workdir: Path) -> Path | None:
    """The folder of the checkpoint Tune restores this trial from (a retry or `--resume`), if any."""
    checkpoint = tune.get_checkpoint()
    return Path(checkpoint.to_directory(str(workdir / "resume"))) if checkpoint is not None else None


def open_trial_run(spec: StudySpec, context: StudyContext, trial: TrialConfig, point: dict[str, Any],
                   seed: int, trial_id: str, pack_tags: dict[str, str] | None = None) -> TrialRun:
    cell = layout.cell_key(point)
    run_name = layout.trial_run_name(point, seed, trial.variant)
    # Where Ray placed the trial: the node, the GPUs (fractional trials share one) and its share of them.
    runtime = ray.get_runtime_context()
    placement = {layout.NODE_ID_TAG: runtime.get_node_id(),
                 layout.GPU_IDS_TAG: ",".join(str(gpu) for gpu in ray.get_gpu_ids()),
                 layout.RESOURCES_TAG: json.dumps(runtime.get_assigned_resources(), sort_keys=True)}
    tags = {layout.STUDY_TAG: spec.name, layout.CELL_TAG: cell, layout.SEED_TAG: str(seed),
            layout.METRIC_TAG: trial.primary_metric, layout.SOURCE_NAME_TAG: layout.SOURCE_NAME, **placement,
            **(pack_tags or {})}
    return TrialRun.open(MlflowClient(context.tracking_uri), context.experiment_id, context.parent_run_id,
                         trial_id, run_name=run_name, tags=tags,
                         params=layout.flatten(trial.model_dump(mode="json")),
                         datasets=[dataset_input(trial)])


def dataset_input(trial: TrialConfig) -> DatasetInput:
    """The trial's training data as an MLflow dataset input: its name and where it is read from (a folder,
    or the library of a built-in dataset), at the resolution and split it is used at."""
    location = data_location(trial.dataset, trial.data_root)
    source = (CodeDatasetSource({"location": location}) if trial.dataset in BUILTIN_LOCATIONS
              else resolve_dataset_source(location))
    split = f", {trial.celeba_split}" if trial.dataset == "celeba" else ""
    dataset = MetaDataset(source, name=f"{trial.dataset} ({trial.resolution} px{split})")
    context = InputTag(MLFLOW_DATASET_CONTEXT, layout.DATASET_CONTEXT)
    return DatasetInput(dataset._to_mlflow_entity(), tags=[context])


def log_to_run(run: TrialRun, workdir: Path, metrics: dict[str, Any], checkpoint_dir: str | None,
               primary: str) -> None:
    """One report of a trial to its MLflow run: metrics (its primary metric `primary` also under
    layout.PRIMARY_METRIC), new sample grids and events, the end."""
    run.log_report(metrics | ({layout.PRIMARY_METRIC: metrics[primary]} if primary in metrics else {}))
    if "objective" in metrics or checkpoint_dir is not None:  # evaluations write sample grids
        run.log_new_artifacts(workdir, sorted(path for pattern in ARTIFACT_PATTERNS
                                              for path in workdir.glob(pattern)))
    if metrics.get("done"):  # before tune.report: Tune may end the actor once it has the last result
        run.finish(metrics)
