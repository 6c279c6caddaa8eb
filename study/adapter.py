"""The thin Ray Tune adapter: one Tune trial runs trainables' `train()` and mirrors its reports to MLflow.

Every report goes to MLflow (step = iteration); only the reports that carry `objective` (evaluations and the
final report) go to Tune, so ASHA and Optuna only ever see finite values. Checkpoints are Tune checkpoints of
train's `workdir/checkpoint/` folder; a resumed trial finds its MLflow run by its cell and seed.
A pack (`pack_size` > 1) is one Tune trial running `train_pack()`: each member reports to its own MLflow run.

What fails every time is not retried: a DETERMINISTIC_ERRORS error (bad config, data, weights, an image that
cannot be decoded, a checkpoint of another config) ends the trial's run FAILED with the message (tag and
artifact), and the trial ends normally with `failed` = 1 in its last result, so Ray does not retry it; any
other error (a lost node, an outage longer than `tracking.outage_wait_s`, a full disk) is Ray's to retry.
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
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
from study.tracking import TrackingGuard, TrialRun, quiet_mlflow, redacted
from trainables.config import ConfigError, TrialConfig
from trainables.metrics.reference import BUILTIN_LOCATIONS, data_location
from trainables.packing import member_name, train_pack
from trainables.train import train
from trainables.trial import CHECKPOINT_FILE, CheckpointError, load_checkpoint

ARTIFACT_PATTERNS = (layout.SAMPLES_PATTERN, layout.EVENTS_ARTIFACT)  # in the trial's folder
PATH_FIELDS = ("data_root", "cache_dir", "inception_weights")  # resolved against the driver's folder
# Errors of a trial's input, which every attempt would meet again: ConfigError (a config or a checkpoint of
# another config), the data's ValueErrors (an undecodable or too small image, a bad array),
# DatasetNotFoundError and InceptionWeightsMissingError (FileNotFoundError), a data_root that is a file.
DETERMINISTIC_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


@dataclass(frozen=True)
class StudyContext:
    """What every trial of a study needs from the driver (small: it travels with each trial)."""

    spec: dict[str, Any]  # StudySpec.model_dump(mode="json")
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    cwd: str  # the driver's working folder: relative paths of the spec are relative to it
    storage: str  # Ray's storage root (resolved), named when its disk is full


def use_cpu_share(spec: StudySpec) -> None:
    """Torch's CPU threads = the trial's CPU share (resources.cpus, at least 1), whatever the worker's
    environment: a CPU run is reproducible only at one thread count (README: Reproducibility), and the
    trial's run records it (TORCH_THREADS_TAG)."""
    torch.set_num_threads(max(1, int(spec.resources.cpus)))


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
    quiet_mlflow()
    spec = StudySpec.model_validate(context.spec)
    use_cpu_share(spec)
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
        result = run.final_result()
        if result.get("failed"):
            result = failed_result(trial, run)
        tune.report({**result, "mlflow_seconds": run.log_seconds})
        return

    if resume_from is not None:
        run.log_resume(checkpoint_iteration(resume_from))

    def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        log_to_run(run, workdir, metrics, checkpoint_dir, trial.primary_metric)
        if "objective" not in metrics:
            return
        result = {key: value for key, value in metrics.items() if key != "done"}  # `done` ends a Tune trial
        result["mlflow_seconds"] = run.log_seconds
        report_to_tune(result, checkpoint_dir, context)

    try:
        check_params(run, trial, point, seed)
        train(trial, report, workdir=workdir, resume_from=resume_from)
    except DETERMINISTIC_ERRORS as exc:
        fail_runs([run], exc)
        tune.report(failed_result(trial, run))


def run_pack(spec: StudySpec, members: list[tuple[dict[str, Any], int]], context: StudyContext) -> None:
    """K trials as one Tune trial (trainables/packing.py): each member its own MLflow run, Tune sees the pack.

    Member k's run has trial_id `<Tune trial id>_<k>` and tags `pack` (the Tune trial id) and `pack_member`.
    Tune gets the pack's results: iteration, it_per_s summed over the active members, the best member
    objective, `diverged` (members diverged so far), `members_ended`, `failed` (members failed by a
    deterministic error: one such error fails the whole pack, one computation), and the pack checkpoint.
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
    failed = {k for k, result in recorded.items() if result.get("failed")}
    objectives = {k: result["objective"] for k, result in recorded.items()
                  if "objective" in result and k not in failed}
    diverged = {k for k, result in recorded.items() if result.get("diverged")}
    evaluated: list[int] = []  # members that reported an objective at the current logging step

    def pack_result(metrics: dict[str, Any]) -> dict[str, Any]:
        penalty = trials[0].divergence.diverged_objective  # no member objective yet: as a diverged trial
        return {**metrics, "objective": min(objectives.values(), default=penalty),
                "diverged": len(diverged), "failed": len(failed),
                "members_ended": sum(run.ended for k, run in enumerate(runs) if k not in failed),
                "mlflow_seconds": sum(run.log_seconds for run in runs)}

    def last_iteration() -> dict[str, Any]:
        return {"iteration": max(max(run.last_step, 0) for run in runs), "pack_size": len(runs)}

    if len(recorded) == len(runs):
        tune.report(pack_result(last_iteration()))
        return
    if resume_from is not None:
        for k, run in enumerate(runs):
            if k not in recorded:
                run.log_resume(checkpoint_iteration(resume_from / member_name(k)))

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
            report_to_tune(pack_result(metrics), checkpoint_dir, context)
        evaluated.clear()

    try:
        for k, (run, trial, (point, seed)) in enumerate(zip(runs, trials, members, strict=True)):
            if k not in recorded:
                check_params(run, trial, point, seed)
        train_pack(trials, [member_report(k) for k in range(len(runs))], workdir=workdir,
                   resume_from=resume_from, pack_report=pack_report)
    except DETERMINISTIC_ERRORS as exc:
        unended = [k for k, run in enumerate(runs) if not run.ended]
        fail_runs([runs[k] for k in unended], exc)
        failed.update(unended)
        tune.report(pack_result(last_iteration()))


def check_params(run: TrialRun, trial: TrialConfig, point: dict[str, Any], seed: int) -> None:
    """ConfigError naming the fields when a run continued holds other params than this trial's config
    (MLflow would say the trial trained with values it did not)."""
    differing = run.differing_params(layout.flatten(trial.model_dump(mode="json")))
    if differing:
        raise ConfigError(f"trial {layout.cell_key(point) or '(base)'} seed {seed}: its config differs from "
                          "its MLflow run's params "
                          f"(run {run.run_id}) in {', '.join(differing)}; resume with the spec it was "
                          "started with, or start the study afresh")


def fail_runs(runs: list[TrialRun], exc: BaseException) -> None:
    """End each run FAILED by a deterministic error: message and traceback on the run, and in Ray's log."""
    message = redacted(f"{type(exc).__name__}: {exc}")
    details = redacted(traceback.format_exc())
    print(f"failed, not retried (it would fail the same way again): {message}", file=sys.stderr, flush=True)
    for run in runs:
        run.fail(message, details)


def failed_result(trial: TrialConfig, run: TrialRun) -> dict[str, Any]:
    """The last result of a trial failed by a deterministic error: `failed` 1, its message, and the objective
    of a diverged trial, so that Optuna and ASHA see a finite value."""
    return {"iteration": max(run.last_step, 0), "objective": trial.divergence.diverged_objective,
            "diverged": 0, "failed": 1, "error": run.final_result().get("error", ""),
            "mlflow_seconds": run.log_seconds}


def report_to_tune(result: dict[str, Any], checkpoint_dir: str | None, context: StudyContext) -> None:
    """tune.report with the checkpoint, which Ray copies into its storage: a full disk there is named, with
    the folder and its free space (pyarrow's own error names neither)."""
    checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    try:
        tune.report(result, checkpoint=checkpoint)
    except OSError as exc:
        if checkpoint is None or (exc.errno != errno.ENOSPC and "No space left" not in str(exc)):
            raise
        tune_context = tune.get_context()  # where Ray copies it: <storage>/<experiment>/<trial folder>
        trial_folder = Path(tune_context.get_trial_dir()).name
        target = f"{context.storage.rstrip('/')}/{tune_context.get_experiment_name()}/{trial_folder}"
        free = ""
        if "://" not in context.storage and Path(target).is_dir():
            free = f"; {shutil.disk_usage(target).free} bytes free there"
        raise CheckpointError(f"cannot copy checkpoint {checkpoint_dir} into Ray's storage "
                              f"{redacted(target)} (no space left on device){free}; Ray keeps the previous "
                              "checkpoint") from None


def checkpoint_iteration(folder: Path) -> int:
    """The iteration a trial's checkpoint folder was saved at."""
    return int(load_checkpoint(folder / CHECKPOINT_FILE, torch.device("cpu"))["iteration"])


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
                 layout.RESOURCES_TAG: json.dumps(runtime.get_assigned_resources(), sort_keys=True),
                 layout.TORCH_THREADS_TAG: str(torch.get_num_threads())}
    tags = {layout.STUDY_TAG: spec.name, layout.CELL_TAG: cell, layout.SEED_TAG: str(seed),
            layout.METRIC_TAG: trial.primary_metric, layout.SOURCE_NAME_TAG: layout.SOURCE_NAME, **placement,
            **(pack_tags or {})}
    return TrialRun.open(MlflowClient(context.tracking_uri), context.experiment_id, context.parent_run_id,
                         trial_id, run_name=run_name, tags=tags, datasets=[dataset_input(trial)],
                         params=layout.flatten(trial.model_dump(mode="json")),
                         guard=TrackingGuard(context.tracking_uri, spec.tracking.outage_wait_s))


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
