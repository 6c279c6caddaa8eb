"""A study as a Ray Tune Tuner: search space, searcher, scheduler, resources, run and failure configs.

Grid: `tune.grid_search` over the expanded points times a `seed` grid axis, or with `pack_size` > 1 over the
packs of `grid_packs` (a Tune trial per pack, an MLflow run per member). Random and Optuna: an Optuna
searcher (RandomSampler, TPE or CMA-ES) wrapped so that each suggested point runs once per seed and the
searcher learns the mean over seeds of each objective.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
import pyarrow.fs
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.repeater import Repeater

from study.spec import (
    Bundle,
    Choice,
    LogUniform,
    RandInt,
    StudySpec,
    Uniform,
    axis_values,
    expand_grid,
    grid_packs,
)
from trainables.config import parse_config

METRIC, MODE = "objective", "min"
CHECKPOINT_FOLDER = re.compile(r"checkpoint_(\d+)")  # how Tune names a trial's checkpoint folders


class SeedReplicates(Repeater):
    """Repeater for one or several objectives: every point runs for each seed; the searcher gets the means."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, **kwargs: Any) -> None:
        metrics = self.searcher.metric if isinstance(self.searcher.metric, list) else [self.searcher.metric]
        group = self._trial_id_to_group[trial_id]
        group.report(trial_id, [float(result.get(m, np.nan)) if result else np.nan for m in metrics])
        if group.finished_reporting():
            means = np.nanmean(np.array(group.scores(), dtype=float), axis=0)
            self.searcher.on_trial_complete(group.primary_trial_id,
                                            result=dict(zip(metrics, means.tolist(), strict=True)), **kwargs)


def tune_domain(axis: Any) -> Any:
    """A spec axis as a Tune search domain (lists and bundles become categorical choices)."""
    if isinstance(axis, list | Bundle):
        return tune.choice(axis_values(axis))
    if isinstance(axis, Choice):
        return tune.choice(axis.values)
    if isinstance(axis, LogUniform):
        return tune.loguniform(axis.low, axis.high)
    if isinstance(axis, Uniform):
        return tune.uniform(axis.low, axis.high)
    if isinstance(axis, RandInt):
        return tune.randint(axis.low, axis.high + 1)  # Tune's upper bound is exclusive, the spec's inclusive
    raise TypeError(f"no Tune domain for {axis!r}")


def param_space(spec: StudySpec) -> dict[str, Any]:
    if spec.search.kind == "grid" and spec.pack_size > 1:  # one Tune trial per pack: its members' points
        packs = [[{"point": point, "seed": seed} for point, seed in pack] for pack in grid_packs(spec)]
        return {"pack": tune.grid_search(packs)}
    if spec.search.kind == "grid":
        points = [point for point, seed in expand_grid(spec) if seed == spec.seeds[0]]
        return {"point": tune.grid_search(points), "seed": tune.grid_search(spec.seeds)}
    return {"point": {name: tune_domain(axis) for name, axis in spec.axes.items()}}


def search_algorithm(spec: StudySpec) -> SeedReplicates | None:
    """None for a grid (Tune's own variant generator); else an Optuna searcher repeated over the seeds."""
    search = spec.search
    if search.kind == "grid":
        return None
    if search.kind == "random":
        sampler = optuna.samplers.RandomSampler(seed=search.seed)
    elif search.sampler == "cmaes":
        sampler = optuna.samplers.CmaEsSampler(seed=search.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=search.seed)
    if len(search.objectives) > 1:
        searcher = OptunaSearch(metric=list(search.objectives), mode=[MODE] * len(search.objectives),
                                sampler=sampler)
    else:
        searcher = OptunaSearch(sampler=sampler)  # metric and mode come from TuneConfig
    return SeedReplicates(searcher, repeat=len(spec.seeds), set_index=True)


def scheduler(spec: StudySpec) -> ASHAScheduler | None:
    if spec.scheduler is None:
        return None
    iterations = parse_config(spec.base).iterations
    return ASHAScheduler(time_attr="iteration", max_t=spec.scheduler.max_t or iterations,
                         grace_period=spec.scheduler.grace_period,
                         reduction_factor=spec.scheduler.reduction_factor)


def trial_count(spec: StudySpec) -> int | None:
    """Trials the study will run; None for a search bounded by time alone."""
    if spec.search.kind == "grid":
        return len(expand_grid(spec))
    return spec.budget.samples * len(spec.seeds) if spec.budget.samples else None


def trial_resources(spec: StudySpec) -> dict[str, float]:
    return {"cpu": spec.resources.cpus, "gpu": spec.resources.gpu or 0.0}


def trial_dirname(trial: Any) -> str:
    """Short trial folders: the default name holds every axis value and overflows path limits."""
    return f"trial_{trial.trial_id}"


def trainable(run: Callable[..., None], spec: StudySpec, **parameters: Any) -> Any:
    return tune.with_resources(tune.with_parameters(run, **parameters), trial_resources(spec))


class CheckpointRetention(tune.Callback):
    """Deletes a trial's superseded checkpoints once no snapshot of the experiment state can name them.

    Tune's own `CheckpointConfig(num_to_keep)` deletes the previous checkpoint before the next snapshot of
    the experiment state is written: a driver killed in between leaves a snapshot naming a folder that is
    gone, and `--resume` fails that trial ("Could not recover from checkpoint as it does not exist on
    storage anymore").
    Tune calls `get_state` right after it writes a snapshot; checkpoints older than the one the previous
    snapshot named are then named by neither the snapshot on storage nor one still uploading to it.
    """

    def __init__(self) -> None:
        self._trials: list[Any] = []
        self._named_last: dict[str, int] = {}  # trial id -> checkpoint index the last snapshot named
        self._safe_below: dict[str, int] = {}  # trial id -> index the snapshot before it named: older can go
        self._deleted_below: dict[str, int] = {}

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._trials = trials

    def get_state(self) -> None:
        named = {trial.trial_id: checkpoint_index(trial.checkpoint.path)
                 for trial in self._trials if trial.checkpoint is not None}
        self._safe_below, self._named_last = self._named_last, named
        return None  # nothing to restore: a resumed driver starts from what its snapshot names

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._delete(trials)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # Tune wrote (and uploaded: wait=True) a final snapshot just before: only what it names is needed.
        self._safe_below = self._named_last
        self._delete(trials)

    def _delete(self, trials: list[Any]) -> None:
        for trial in trials:
            below = self._safe_below.get(trial.trial_id, 0)
            if below > self._deleted_below.get(trial.trial_id, 0):
                delete_checkpoints_below(trial.storage.storage_filesystem, trial.storage.trial_fs_path, below)
                self._deleted_below[trial.trial_id] = below


def checkpoint_index(path: str) -> int:
    return int(CHECKPOINT_FOLDER.fullmatch(path.rstrip("/").rsplit("/", 1)[-1]).group(1))


def delete_checkpoints_below(filesystem: pyarrow.fs.FileSystem, trial_path: str, index: int) -> None:
    """Delete the trial's checkpoint folders numbered below index (on any storage Tune writes to)."""
    for info in filesystem.get_file_info(pyarrow.fs.FileSelector(trial_path, allow_not_found=True)):
        found = CHECKPOINT_FOLDER.fullmatch(info.base_name)
        if info.type == pyarrow.fs.FileType.Directory and found and int(found.group(1)) < index:
            filesystem.delete_dir(info.path)


def build_tuner(spec: StudySpec, trainable_fn: Any, storage: str, ray_name: str,
                callbacks: list[tune.Callback]) -> tune.Tuner:
    single = len(spec.search.objectives) == 1
    tune_config = tune.TuneConfig(
        metric=METRIC if single else None, mode=MODE if single else None,
        search_alg=search_algorithm(spec), scheduler=scheduler(spec),
        num_samples=1 if spec.search.kind == "grid" else (trial_count(spec) or -1),
        max_concurrent_trials=spec.max_concurrent, time_budget_s=spec.budget.time_s,
        trial_dirname_creator=trial_dirname,
        reuse_actors=True,  # a new trial reuses a finished trial's process: no second torch import
    )
    run_config = tune.RunConfig(
        name=ray_name, storage_path=storage, callbacks=[*callbacks, CheckpointRetention()],
        verbose=0,  # progress: study/progress.py
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),  # CheckpointRetention deletes them, safely
    )
    return tune.Tuner(trainable_fn, param_space=param_space(spec), tune_config=tune_config,
                      run_config=run_config)


def restore_tuner(path: str, trainable_fn: Any, callbacks: list[tune.Callback]) -> tune.Tuner:
    """Continue an interrupted study: unfinished trials resume from their checkpoints, errored ones too.

    `path` must be the study's own Ray folder (study/tracking.py: read_study_state): Ray unpickles its
    tuner.pkl. The trainable (with this driver's tracking URI) and the callbacks are this driver's, never the
    pickled ones: Ray keeps the run config of the first start, callbacks included, and offers no public way to
    replace them (ray-project/ray#41364), hence its TunerInternal's run config.
    """
    tuner = tune.Tuner.restore(path, trainable_fn, resume_unfinished=True, resume_errored=True)
    tuner._local_tuner.get_run_config().callbacks = [*callbacks, CheckpointRetention()]
    return tuner
