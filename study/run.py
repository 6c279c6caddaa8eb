"""Run a study: `python -m study [--study NAME|PATH] [--set key=value ...] [--resume] [--tracking-uri URI]
[--storage PATH] [--dry-run]`, or the same as `python study/run.py ...` (the file `ray submit` runs).

Validates the whole spec, the tracking URI and the storage first (exit code 2 and a message naming the
problem; nothing is started or written). Then joins the Ray cluster it runs on (`ray submit`, $RAY_ADDRESS) or
starts a local Ray, creates the study's MLflow parent run, and runs every trial through Ray Tune, printing
progress.
`--dry-run` prints the expanded trials and the resources they need, and starts nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file, Python puts study/ first on the path: put this checkout there instead, so that `study` is
# the package (and no module of study/ shadows a library's of the same name).
if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import os
import time
from collections.abc import Mapping
from typing import Any

from study import layout
from study.spec import StudyError, StudySpec, expand_grid, grid_packs, load_spec, trial_config
from study.tracking import (
    check_storage,
    check_tracking_uri,
    latest_parent_run,
    resolve_storage,
    resolve_tracking_uri,
)
from study.tuning import trial_count, trial_resources

REPOSITORY = Path(__file__).resolve().parent.parent
SHOWN_FIELDS = ("g_lr", "d_lr", "beta1", "beta2", "n_dis", "variant", "scale", "iterations")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="default", metavar="NAME|PATH",
                        help="a preset name (study/presets/) or a study YAML file (default: default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field: base.iterations=200, seeds=1, resources.gpu=0.25")
    parser.add_argument("--resume", action="store_true",
                        help="restore the study's latest interrupted run and finish it")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: spec, $MLFLOW_TRACKING_URI, "
                                               "sqlite:///mlflow.db)")
    parser.add_argument("--storage", help="Ray results: local/NFS path or s3:// (default: spec, "
                                          "$GAN_STABILITY_STORAGE, ./runs)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the trials and resources; start nothing")
    return parser.parse_args(argv)


def print_plan(spec: StudySpec, preset: str, tracking_uri: str, storage: str) -> None:
    """The expanded trials and what they need, one line each."""
    resources = trial_resources(spec)
    count = trial_count(spec)
    print(f"study {spec.name} ({'preset ' + preset if preset else 'file'}): {spec.search.kind} search, "
          f"axes {', '.join(spec.axis_names) or '(none)'}")
    print(f"tracking {tracking_uri}; storage {storage}")
    print(f"each trial: {resources['cpu']:g} CPU, {resources['gpu']:g} GPU; at most "
          f"{spec.max_concurrent or 'as many as fit'} at once")
    if spec.search.kind == "grid":
        print(f"{count} trials ({count // len(spec.seeds)} cells x {len(spec.seeds)} seeds): "
              f"{count * resources['cpu']:g} CPU and {count * resources['gpu']:g} GPU trial-slots in all")
        if spec.pack_size > 1:
            packs = grid_packs(spec)
            print(f"packed: {len(packs)} Ray trials of up to {spec.pack_size} trials each (sizes "
                  f"{', '.join(str(len(pack)) for pack in packs)}), each with the resources above")
        for index, (point, seed) in enumerate(expand_grid(spec)):
            config = trial_config(spec, point, seed)
            fields = " ".join(f"{name}={getattr(config, name)}" for name in SHOWN_FIELDS)
            print(f"  {index:4d}  {layout.cell_key(point) or '(base)'}  seed={seed}  {fields}")
    else:
        budget = f"{spec.budget.samples} points x {len(spec.seeds)} seeds = {count} trials" if count else ""
        if spec.budget.time_s:
            budget += f"{'; ' if budget else ''}at most {spec.budget.time_s:g} s"
        sampler = spec.search.sampler if spec.search.kind == "optuna" else "random"
        print(f"{spec.search.kind} search ({sampler}), objectives {', '.join(spec.objectives)}: {budget}")
        for name, axis in spec.axes.items():
            shown = axis if isinstance(axis, list) else axis.model_dump(mode="json")
            print(f"  {name}: {json.dumps(shown)}")


def check_resume(spec: StudySpec, tracking_uri: str) -> None:
    """--resume needs the study's parent run and its Ray experiment, with the same spec."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise StudyError(f"--resume: no tracking database {tracking_uri.removeprefix('sqlite:///')}")
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(spec.tracking.experiment or spec.name)
    parent = latest_parent_run(client, experiment.experiment_id, spec.name) if experiment else None
    if parent is None:
        raise StudyError(f"--resume: no earlier run of study {spec.name!r} in {tracking_uri}")
    path = parent.data.tags.get(layout.RAY_EXPERIMENT_TAG, "")
    if not tune.Tuner.can_restore(path):
        raise StudyError(f"--resume: the Ray experiment {path!r} of study {spec.name!r} cannot be restored")
    changed = sorted(key for key, value in layout.flatten(spec.model_dump(mode="json")).items()
                     if parent.data.params.get(key) != value)
    if changed:
        raise StudyError(f"--resume: the spec differs from the interrupted study's in {', '.join(changed)}")


def init_ray() -> None:
    """Join the cluster this runs on ($RAY_ADDRESS, or `ray start` on this machine), else start Ray here."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        ray.init(include_dashboard=False)


def run_study(spec: StudySpec, preset: str, tracking_uri: str, storage: str, resume: bool) -> int:
    """Run (or resume) the study under its MLflow parent run; 0 when every trial ended (diverged or not)."""
    from mlflow.tracking import MlflowClient

    from analysis.report import build_report
    from study.adapter import StudyContext, run_trial
    from study.progress import TrialStatusCallback
    from study.tracking import create_parent_run, finish_parent_run, study_experiment, trial_outcomes
    from study.tuning import build_tuner, restore_tuner, trainable

    client = MlflowClient(tracking_uri)
    experiment_id = study_experiment(client, spec)
    if resume:
        parent = latest_parent_run(client, experiment_id, spec.name)
        parent_run_id, ray_path = parent.info.run_id, parent.data.tags[layout.RAY_EXPERIMENT_TAG]
        client.update_run(parent_run_id, status="RUNNING")
        client.set_tag(parent_run_id, layout.STATUS_TAG, layout.RUNNING)
    else:
        ray_name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        ray_path = f"{storage.rstrip('/')}/{ray_name}"
        parent_run_id = create_parent_run(client, experiment_id, spec, preset, ray_path, REPOSITORY)
    print(f"study {spec.name}: MLflow experiment {experiment_id}, parent run {parent_run_id} at "
          f"{tracking_uri}; Ray results in {ray_path}", flush=True)

    init_ray()
    context = StudyContext(spec=spec.model_dump(mode="json"), tracking_uri=tracking_uri,
                           experiment_id=experiment_id, parent_run_id=parent_run_id, cwd=str(Path.cwd()))
    trainable_fn = trainable(run_trial, spec, context=context)
    status = layout.FAILED
    try:
        if resume:
            tuner = restore_tuner(ray_path, trainable_fn)
        else:
            tuner = build_tuner(spec, trainable_fn, storage, ray_path.rsplit("/", 1)[1],
                                [TrialStatusCallback(tracking_uri, experiment_id, parent_run_id,
                                                     trial_count(spec), spec.seeds)])
        cpu_started = time.process_time()
        results = tuner.fit()
        driver_cpu_s = time.process_time() - cpu_started
        ended, failed = tally(results)
        unfinished = (trial_count(spec) or len(results)) - ended - failed
        status = layout.FINISHED if unfinished == 0 and not failed else layout.FAILED
    finally:
        finish_parent_run(client, parent_run_id, status)

    frame = results.get_dataframe() if len(results) else None
    print(summarize(trial_outcomes(client, experiment_id, parent_run_id), frame, failed), flush=True)
    if frame is not None and "mlflow_seconds" in frame:
        print(overhead(frame, driver_cpu_s), flush=True)
    if unfinished > 0:
        print(f"interrupted: {unfinished} trials unfinished; continue with --resume", flush=True)
    print(f"report: {build_report(spec.name, tracking_uri, Path('reports') / spec.name)}", flush=True)
    print(f"browse: mlflow ui --backend-store-uri {tracking_uri}", flush=True)
    return 0 if status == layout.FINISHED else 1


def tally(results: Any) -> tuple[int, int]:
    """(trials ended, trials failed) of a study's Tune results; a pack counts its members."""
    ended = failed = 0
    for result in results:
        members = len(result.config.get("pack", [None]))
        if result.error is not None:
            failed += members
        elif members > 1:  # a pack's every result counts its members ended so far (study/adapter.py)
            ended += int(result.metrics.get("members_ended", 0))
        # Ray marks `done` on trials whose function returned; an interrupt (Ctrl+C) leaves the rest without.
        # A trial that ended just before its driver was killed is restored without `done`, but its last
        # result is its final report, the only one that carries `divergence_step` (trainables/train.py).
        elif result.metrics.get("done") or "divergence_step" in result.metrics:
            ended += 1
    return ended, failed


def summarize(outcomes: Mapping[str, int], frame: Any, failed: int = 0) -> str:
    """One line: how many trials ended with each outcome (layout.OUTCOMES, as their MLflow runs say; `failed`:
    Tune's count of failed trials where larger, as one that failed before its run existed has none), and the
    best objective of the Tune results `frame`."""
    outcomes = {**outcomes, layout.FAILED: max(outcomes.get(layout.FAILED, 0), failed)}
    ended = sum(outcomes.get(name, 0) for name in layout.OUTCOMES)
    counts = ", ".join(f"{outcomes.get(name, 0)} {name}" for name in layout.OUTCOMES)
    if frame is None or "objective" not in frame or frame["objective"].isna().all():
        return f"{ended} trials ended: {counts}; no objective was reported"
    best = frame.loc[frame["objective"].idxmin()]
    return (f"{ended} trials ended: {counts}; best objective {best['objective']:.4g} "
            f"(trial {best['trial_id']})")


def overhead(frame: Any, driver_cpu_s: float) -> str:
    """The service's own cost against the trials' time: the driver's CPU and the trials' MLflow logging."""
    trial_s = float(frame["time_total_s"].sum())
    mlflow_s = float(frame["mlflow_seconds"].fillna(0).sum())
    return (f"service overhead: driver CPU {driver_cpu_s:.1f} s ({100 * driver_cpu_s / trial_s:.1f}%), "
            f"MLflow logging {mlflow_s:.1f} s ({100 * mlflow_s / trial_s:.1f}%) of {trial_s:.0f} s of trials")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per artifact read
    cwd = Path.cwd()
    try:
        spec, preset = load_spec(args.study, args.overrides)
        tracking_uri = resolve_tracking_uri(args.tracking_uri, spec, cwd)
        storage = resolve_storage(args.storage, spec, cwd)
        check_tracking_uri(tracking_uri)
        check_storage(storage)
        if args.dry_run:
            print_plan(spec, preset, tracking_uri, storage)
            return 0
        if args.resume:
            check_resume(spec, tracking_uri)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_study(spec, preset, tracking_uri, storage, args.resume)


if __name__ == "__main__":
    sys.exit(main())
