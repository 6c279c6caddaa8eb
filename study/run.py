"""Run a study: `python -m study [--study NAME|PATH] [--set key=value ...] [--resume] [--tracking-uri URI]
[--storage PATH] [--ray-address auto|HOST:PORT] [--dry-run]`, or the same as `python study/run.py ...` (the
file `ray submit` runs).

Validates the whole spec, the tracking URI, the storage and the Ray address first, then runs the
pre-flight (study/preflight.py: data, weights, cache, devices, resources); each refusal is exit code 2 and a
message naming the problem, with nothing started or written. Then starts a Ray of its own, or joins the
cluster that `--ray-address` or $RAY_ADDRESS names (never one it merely finds on the machine), checks the
trials' resources against it, creates the study's MLflow parent run and its state file in the storage, and
runs every trial through Ray Tune, printing progress. `--resume` restores the Ray experiment the study's
state file names (`study/tracking.py`), only with the spec it started with. At every exit the parent run and
every trial run get a terminal status. `--dry-run` prints the expanded trials and the resources they need,
after the pre-flight, and starts nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file, Python puts study/ first on the path: put this checkout there instead, so that `study` is
# the package (and no module of study/ shadows a library's of the same name).
if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import errno
import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from study import layout
from study.preflight import check_cluster, preflight
from study.spec import StudyError, StudySpec, expand_grid, grid_packs, load_spec, trial_config
from study.tracking import (
    check_storage,
    check_tracking_uri,
    quiet_mlflow,
    read_study_state,
    redacted,
    resolve_storage,
    resolve_tracking_uri,
    resume_fields,
    spec_digest,
    state_path,
)
from study.tuning import trial_count, trial_resources

REPOSITORY = Path(__file__).resolve().parent.parent
SHOWN_FIELDS = ("g_lr", "d_lr", "beta1", "beta2", "n_dis", "variant", "scale", "iterations")
RAY_ADDRESS = re.compile(r"auto|local|[A-Za-z0-9_.-]+:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5}")


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
    parser.add_argument("--ray-address", metavar="auto|HOST:PORT",
                        help="join this Ray cluster (`auto`: the one `ray start` runs on this machine; "
                             "default: $RAY_ADDRESS, else a Ray of the study's own)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the trials and resources; start nothing")
    return parser.parse_args(argv)


def print_plan(spec: StudySpec, preset: str, tracking_uri: str, storage: str) -> None:
    """The expanded trials and what they need, one line each."""
    resources = trial_resources(spec)
    count = trial_count(spec)
    print(f"study {spec.name} ({'preset ' + preset if preset else 'file'}): {spec.search.kind} search, "
          f"axes {', '.join(spec.axis_names) or '(none)'}")
    print(f"tracking {redacted(tracking_uri)}; storage {redacted(storage)}")
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


def check_resume(spec: StudySpec, tracking_uri: str, storage: str) -> dict[str, Any]:
    """--resume needs the study's state file in this storage, its Ray experiment and its parent run in this
    tracking store, and the spec it started with (compared both ways: a key removed is a difference too).
    Returns the state. Nothing comes from tracking tags: anyone who reaches the tracking server can set them,
    and Ray unpickles what is in the folder it restores."""
    from mlflow.exceptions import MlflowException
    from ray import tune

    from study.tracking import tracking_client

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise StudyError(f"--resume: no tracking database {tracking_uri.removeprefix('sqlite:///')}")
    state = read_study_state(storage, spec.name)
    if state is None:
        raise StudyError(f"--resume: study {spec.name!r} was never started with storage {redacted(storage)} "
                         f"(no {redacted(state_path(storage, spec.name))})")
    path = f"{storage.rstrip('/')}/{state['ray_folder']}"
    if not tune.Tuner.can_restore(path):
        raise StudyError(f"--resume: the Ray experiment {redacted(path)} of study {spec.name!r} cannot be "
                         "restored")
    now = resume_fields(spec)
    changed = spec_changes(state["spec"], now)
    if changed:
        raise StudyError(f"--resume: the spec differs from the one study {spec.name!r} started with in "
                         f"{'; '.join(changed)}; resume with that spec, or start the study afresh")
    if spec_digest(now) != state.get("spec_hash"):
        raise StudyError(f"--resume: {redacted(state_path(storage, spec.name))} is inconsistent (its spec "
                         "hash is not its spec's)")
    try:
        parent = tracking_client(tracking_uri).get_run(state["parent_run_id"])
    except MlflowException:
        raise StudyError(f"--resume: the parent run {state['parent_run_id']} of study {spec.name!r} is not "
                         f"at {redacted(tracking_uri)}; pass the --tracking-uri the study ran with (or where "
                         "its server moved)") from None
    tags = parent.data.tags
    if (tags.get(layout.ROLE_TAG), tags.get(layout.STUDY_TAG)) != (layout.STUDY_ROLE, spec.name):
        raise StudyError(f"--resume: run {state['parent_run_id']} at {redacted(tracking_uri)} is not the "
                         f"parent run of study {spec.name!r}")
    return state


def spec_changes(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """Each flattened key whose value differs, one on a single side included: `base.n_dis (2 -> unset)`."""
    def shown(values: dict[str, str], key: str) -> str:
        return values[key][:60] if key in values else "unset"

    return [f"{key} ({shown(before, key)} -> {shown(now, key)})" for key in sorted(set(before) | set(now))
            if before.get(key) != now.get(key)]


def check_ray_address(cli_address: str | None) -> str | None:
    """The Ray cluster to join (--ray-address, else $RAY_ADDRESS), checked; None: start a Ray of our own."""
    address = cli_address or os.environ.get("RAY_ADDRESS") or None
    what = "--ray-address" if cli_address else "$RAY_ADDRESS"
    if address is not None and not RAY_ADDRESS.fullmatch(address):
        raise StudyError(f"{what} {redacted(address)}: expected auto, local or HOST:PORT (the cluster's GCS "
                         "address; the driver runs on the cluster, not through Ray Client or the dashboard)")
    return None if address == "local" else address


def init_ray(address: str | None) -> None:
    """Join the cluster `address` names (`auto`: the one `ray start` runs on this machine); with None, start
    a Ray of this driver's own. A Ray found running on the machine is never joined unasked: it may be
    anyone's, and the trials would die with its driver."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        ray.init(address="local", include_dashboard=False)
    else:
        ray.init(address=address)


def run_study(spec: StudySpec, preset: str, tracking_uri: str, storage: str,
              state: dict[str, Any] | None) -> int:
    """Run (or, given the state of its last start, resume) the study under its MLflow parent run, on the Ray
    main() joined; 0 when every trial ended (diverged or not), 1 when one failed or the study was
    interrupted."""
    from analysis.report import build_report, report_folder
    from study.adapter import StudyContext, run_trial
    from study.progress import TrialStatusCallback
    from study.tracking import (
        TrackingGuard,
        close_runs_of_dead_drivers,
        create_parent_run,
        new_ray_folder,
        reopen_parent_run,
        study_experiment,
        tracking_client,
        trial_outcomes,
        write_study_state,
    )
    from study.tuning import build_tuner, restore_tuner, trainable

    client = tracking_client(tracking_uri)
    experiment_id = study_experiment(client, spec)
    for closed in close_runs_of_dead_drivers(client, experiment_id, spec.name):
        print(f"closed parent run {closed} of a driver that died, and its running trial runs, as "
              f"{layout.KILLED}", flush=True)
    if state is not None:
        parent_run_id, ray_folder = state["parent_run_id"], state["ray_folder"]
        reopen_parent_run(client, parent_run_id)
    else:
        ray_folder = new_ray_folder(spec.name)
        parent_run_id = create_parent_run(client, experiment_id, spec, preset,
                                          f"{storage.rstrip('/')}/{ray_folder}", REPOSITORY)
        write_study_state(storage, spec, ray_folder, parent_run_id)
    ray_path = f"{storage.rstrip('/')}/{ray_folder}"
    print(f"study {spec.name}: MLflow experiment {experiment_id}, parent run {parent_run_id} at "
          f"{redacted(tracking_uri)}; Ray results in {redacted(ray_path)}", flush=True)

    callback = TrialStatusCallback(tracking_uri, experiment_id, parent_run_id, trial_count(spec), spec.seeds)
    status = layout.FAILED  # unless the study gets further
    try:
        context = StudyContext(spec=spec.model_dump(mode="json"), tracking_uri=tracking_uri,
                               experiment_id=experiment_id, parent_run_id=parent_run_id, cwd=str(Path.cwd()),
                               storage=storage)
        trainable_fn = trainable(run_trial, spec, context=context)
        if state is not None:
            tuner = restore_tuner(ray_path, trainable_fn, [callback])
        else:
            tuner = build_tuner(spec, trainable_fn, storage, ray_folder, [callback])
        cpu_started = time.process_time()
        try:
            results = tuner.fit()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            print(f"error: no space left on device writing {exc.filename or 'Ray experiment state'} "
                  f"(Ray's storage {redacted(storage)}): {exc.strerror}; free space and --resume",
                  file=sys.stderr, flush=True)
            return 1
        driver_cpu_s = time.process_time() - cpu_started
        ended, failed = tally(results)
        unfinished = (trial_count(spec) or len(results)) - ended - failed
        status = layout.FAILED if failed else layout.KILLED if unfinished > 0 else layout.FINISHED
    except (KeyboardInterrupt, SystemExit):  # a second Ctrl+C, or SIGTERM (Ray's handler exits)
        status = layout.KILLED
        raise
    finally:
        close_study(client, TrackingGuard(tracking_uri, spec.tracking.outage_wait_s), experiment_id,
                    parent_run_id, callback, status)

    frame = results.get_dataframe() if len(results) else None
    print(summarize(trial_outcomes(client, experiment_id, parent_run_id), frame, failed), flush=True)
    if frame is not None and "mlflow_seconds" in frame:
        print(overhead(frame, driver_cpu_s), flush=True)
    if unfinished > 0:
        print(f"interrupted: {unfinished} trials unfinished; continue with --resume", flush=True)
    report = build_report(spec.name, tracking_uri, report_folder(spec.name), run_id=parent_run_id)
    print(f"report: {report}", flush=True)
    browse = (redacted(tracking_uri) if tracking_uri.startswith(("http://", "https://"))
              else f"mlflow ui --backend-store-uri {redacted(tracking_uri)}, then http://127.0.0.1:5000")
    print(f"browse: {browse.rstrip('/')}{layout.review_path(experiment_id)}", flush=True)
    return 0 if status == layout.FINISHED else 1


def close_study(client: Any, guard: Any, experiment_id: str, parent_run_id: str, callback: Any,
                status: str) -> None:
    """Terminal statuses at the driver's end: the runs the callback could not close get theirs, every trial
    run still RUNNING is KILLED (cut off by this end: --resume continues it), the parent gets `status`. An
    outage of the tracking server is waited out (`guard`); what still fails is closed by the next start."""
    from study.progress import close_trial_run
    from study.tracking import close_running_trial_runs, finish_parent_run

    try:
        for cell, seed, tags in callback.unclosed:
            guard(close_trial_run, client, experiment_id, parent_run_id, cell, seed, tags)
        guard(close_running_trial_runs, client, experiment_id, parent_run_id, layout.KILLED)
        guard(finish_parent_run, client, parent_run_id, status)
    except Exception as exc:
        print(f"warning: the study's MLflow runs could not be closed ({redacted(str(exc)).splitlines()[0]}); "
              "the next start or --resume of the study closes them", file=sys.stderr, flush=True)


def tally(results: Any) -> tuple[int, int]:
    """(trials ended, trials failed) of a study's Tune results; a pack counts its members. A failed trial is
    one Ray's retries did not save, or one failed by a deterministic error (`failed` in its last result)."""
    ended = failed = 0
    for result in results:
        members = len(result.config.get("pack", [None]))
        if result.error is not None:
            failed += members
        elif members > 1:  # a pack's every result counts its members ended so far (study/adapter.py)
            ended += int(result.metrics.get("members_ended", 0))
            failed += int(result.metrics.get("failed", 0))
        elif result.metrics.get("failed"):  # a deterministic error: ended normally, not retried
            failed += 1
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
    quiet_mlflow()
    cwd = Path.cwd()
    state = None
    try:
        spec, preset = load_spec(args.study, args.overrides)
        tracking_uri = resolve_tracking_uri(args.tracking_uri, spec, cwd)
        storage = resolve_storage(args.storage, spec, cwd)
        check_tracking_uri(tracking_uri)
        check_storage(storage)
        ray_address = check_ray_address(args.ray_address)
        found = preflight(spec, ray_address=ray_address)
        for warning in found.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if args.dry_run:
            print_plan(spec, preset, tracking_uri, storage)
            return 0
        if args.resume:
            state = check_resume(spec, tracking_uri, storage)
    except StudyError as exc:
        print(f"error: {redacted(str(exc))}", file=sys.stderr)
        return 2
    try:
        init_ray(ray_address)
        try:  # the pre-flight's part that asks Ray, before the study's first MLflow write
            for note in check_cluster(spec, found):
                print(note, flush=True)
        except StudyError as exc:
            import ray

            print(f"error: {redacted(str(exc))}", file=sys.stderr)
            ray.shutdown()
            return 2
        return run_study(spec, preset, tracking_uri, storage, state)
    except KeyboardInterrupt:
        print("interrupted: continue with --resume", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
