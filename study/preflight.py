"""The pre-flight: what every trial of a study needs, checked in seconds before Ray starts and before anything
is written to MLflow, each distinct need once, every failure reported together (study/run.py exits 2).

- Sizes, seeds and device names: each trial's TrialConfig (trainables/config.py: SIZE_BOUNDS, SEED_MAX,
  DEVICES), validated for every trial by load_spec before this runs.
- Devices under Ray: a trial given a GPU share (`resources.gpu`) sees that one GPU only, as cuda:0.
- What the machine that runs a trial must have (`site_problems`): the data, one image of each file or split
  read as training reads it (trainables.data.sample_images); torch-fidelity's InceptionV3 weights when fid, is
  or kid is asked for, found and hash-checked; a writable cache_dir; the device.
- Resources: with no cluster to join the study starts its own Ray on this machine, so a trial must fit it.
  On a cluster, `check_cluster` (after ray.init, still before any MLflow write and any trial) asks Ray: a node
  that is up, or a node type its autoscaler can start, must hold one trial; and what this machine lacks (data
  that lives on the workers only) is checked again by one Ray task on a worker.
- Warnings, not errors: divergence detectors that a run is too short to ever fire
  (TrialConfig.idle_detectors), and device choices that waste or share a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from study.layout import cell_key
from study.spec import StudyError, StudySpec, corner_points, expand_grid, trial_config
from study.tracking import check_writable_folder
from trainables.config import TrialConfig

INCEPTION_METRICS = ("fid", "is", "kid")
# How long the check on a worker may wait for Ray to place it: an autoscaler may first have to start a node
# (minutes on a cloud, with its setup commands).
WORKER_CHECK_TIMEOUT_S = 900.0
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the autoscaler's config on the head


@dataclass
class Preflight:
    """What passed the pre-flight with a remark: warnings to print, and what is left for `check_cluster`."""

    cluster: str | None  # the address of the Ray cluster the study joins; None: it starts its own Ray here
    warnings: list[str] = field(default_factory=list)
    # Needs this machine lacks, on a cluster (whose workers may have them): check_cluster checks a worker.
    missing_here: list[str] = field(default_factory=list)


def preflight(spec: StudySpec, *, ray_address: str | None = None) -> Preflight:
    """Check what the study's trials need before Ray starts; raise StudyError listing every failure.

    ray_address: the cluster the study joins (study.run.check_ray_address: --ray-address, else $RAY_ADDRESS);
    None: it starts its own Ray here.
    """
    trials = study_trials(spec)
    found = Preflight(cluster=ray_address)
    errors = device_problems(spec, trials, found.warnings)
    if found.cluster is None:
        errors += local_resource_problems(spec)
    site = site_problems(trials)
    if found.cluster is None:
        errors += site
    else:
        found.missing_here = site
        found.warnings += [f"{problem} (on this machine; the study checks a worker of the Ray cluster at "
                           f"{found.cluster} before any trial)" for problem in site]
    idle: dict[str, list[str]] = {}
    for label, config in trials:
        for message in config.idle_detectors:
            idle.setdefault(message, []).append(label)
    found.warnings += labelled(idle, trials, "; that divergence detector stays idle")
    if errors:
        raise StudyError(refusal(spec, errors))
    return found


def check_cluster(spec: StudySpec, found: Preflight) -> list[str]:
    """The pre-flight's part that needs Ray (call after ray.init, before any MLflow write): a trial's
    resources fit a node, and on a cluster what this machine lacked is on a worker. Returns notes to print;
    raises StudyError."""
    where = f"the Ray cluster at {found.cluster}" if found.cluster else "the local Ray"
    errors = cluster_resource_problems(spec, where)
    notes = []
    if not errors and found.missing_here:
        node, problems = check_on_worker(spec, found.missing_here)
        if problems:
            errors += [f"{problem} (on worker node {node}, and on this machine)" for problem in problems]
        else:
            fields = ", ".join(dict.fromkeys(problem.split(":")[0] for problem in found.missing_here))
            notes.append(f"pre-flight: worker node {node} has what this machine lacks ({fields})")
    if errors:
        raise StudyError(refusal(spec, errors))
    return notes


def refusal(spec: StudySpec, errors: list[str]) -> str:
    return (f"study {spec.name!r} cannot start (pre-flight; nothing was started or written):\n  "
            + "\n  ".join(dict.fromkeys(errors)))


# ---- the trials ------------------------------------------------------------------------------------------

def study_trials(spec: StudySpec) -> list[tuple[str, TrialConfig]]:
    """(cell, config) of every cell of a grid, or of a search's base and each axis value and bound alone, at
    the first seed (seeds change none of the needs checked here); relative paths made relative to this
    folder, as the trials get them (study/adapter.py)."""
    from study.adapter import absolute_paths

    seed = spec.seeds[0]
    if spec.search.kind == "grid":
        points = [point for point, point_seed in expand_grid(spec) if point_seed == seed]
    else:
        points = [{}] + [point for _, point in corner_points(spec)]
    return [(cell_key(point) or "(base)", absolute_paths(trial_config(spec, point, seed), Path.cwd()))
            for point in points]


def labelled(failing: dict[str, list[str]], trials: list[tuple[str, TrialConfig]],
             suffix: str = "") -> list[str]:
    """One line per message, naming the cells it applies to unless it applies to all of them."""
    cells = len({label for label, _ in trials})
    lines = []
    for message, labels in failing.items():
        labels = list(dict.fromkeys(labels))
        more = f" and {len(labels) - 1} more" if len(labels) > 1 else ""
        lines.append(message + suffix + ("" if len(labels) == cells else f" (trial {labels[0]}{more})"))
    return lines


# ---- devices and resources -------------------------------------------------------------------------------

def device_problems(spec: StudySpec, trials: list[tuple[str, TrialConfig]],
                    warnings: list[str]) -> list[str]:
    """Devices that cannot work under Ray's GPU assignment (errors); ones that waste or share a GPU (warnings,
    appended to `warnings`)."""
    errors: dict[str, list[str]] = {}
    remarks: dict[str, list[str]] = {}
    gpu = spec.resources.gpu
    for label, config in trials:
        kind, _, index = config.device.partition(":")
        if gpu and kind == "cuda" and index not in ("", "0"):
            message = (f"device: {config.device}: Ray shows a trial only the GPU it gives it (resources.gpu "
                       f"{gpu:g}), as cuda:0; valid: auto, cuda, cuda:0")
            errors.setdefault(message, []).append(label)
        elif gpu and kind == "cpu":
            message = f"device: cpu, while resources.gpu {gpu:g} reserves a GPU share each trial leaves idle"
            remarks.setdefault(message, []).append(label)
        elif not gpu and kind == "cuda":
            message = (f"device: {config.device} with resources.gpu unset: Ray reserves no GPU, so the "
                       "trials on a node share its GPUs unscheduled; set resources.gpu (0.25: four a GPU)")
            remarks.setdefault(message, []).append(label)
    warnings += labelled(remarks, trials)
    return labelled(errors, trials)


def local_resource_problems(spec: StudySpec) -> list[str]:
    """A trial's resources against this machine, where the study starts its own Ray."""
    import torch

    errors = []
    here = "this machine (the study starts its own Ray here: no --ray-address, no $RAY_ADDRESS)"
    gpus = torch.cuda.device_count()
    if spec.resources.gpu and not gpus:
        errors.append(f"resources.gpu: {spec.resources.gpu:g} GPU per trial, but {here} has no GPU (0 CUDA "
                      "devices), so no trial would ever start; valid: leave resources.gpu unset (null), or "
                      "run on a Ray cluster with GPUs (--ray-address)")
    cpus = len(os.sched_getaffinity(0))
    if spec.resources.cpus > cpus:
        errors.append(f"resources.cpus: {spec.resources.cpus:g} CPUs per trial, but {here} has {cpus}, so no "
                      f"trial would ever start; valid: > 0 and <= {cpus}")
    return errors


def cluster_resource_problems(spec: StudySpec, where: str) -> list[str]:
    """Whether one trial fits a node of the running Ray that is up, or one its autoscaler can start."""
    import ray

    need = {"CPU": spec.resources.cpus, "GPU": spec.resources.gpu or 0.0}
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    node_types = autoscaler_node_types()
    shapes = nodes + list((node_types or {}).values())
    if any(shape is None or fits(shape, need) for shape in shapes):  # None: a node type's size is not stated
        return []
    with_gpu = [shape for shape in shapes if need["GPU"] <= shape.get("GPU", 0)]
    types = (", ".join(f"{name} ({size(shape)})" for name, shape in node_types.items()) or "none"
             if node_types is not None else "none known")
    up = ", ".join(map(size, nodes)) or "none"
    found = f"its nodes up: {up}; node types its autoscaler can start: {types}"
    if not with_gpu:
        most = max((shape.get("GPU", 0) for shape in shapes), default=0)
        return [f"resources.gpu: {need['GPU']:g} GPU per trial, but no node of {where} has that ({found}); "
                f"valid: " + (f"<= {most:g}" if most else "leave resources.gpu unset (null)")]
    most = max(shape.get("CPU", 0) for shape in with_gpu)
    nodes_meant = "the nodes that fit its GPU share" if need["GPU"] else "every node"
    return [f"resources.cpus: {need['CPU']:g} CPUs per trial, but of {where}, {nodes_meant} have at most "
            f"{most:g} ({found}); valid: > 0 and <= {most:g}"]


def fits(shape: dict[str, float], need: dict[str, float]) -> bool:
    return all(shape.get(name, 0) >= amount for name, amount in need.items() if amount > 0)


def size(shape: dict[str, float] | None) -> str:
    if shape is None:
        return "size not stated"
    return " ".join(f"{shape.get(name, 0):g} {name}" for name in ("CPU", "GPU"))


def autoscaler_node_types() -> dict[str, dict[str, float] | None] | None:
    """Node types the cluster's autoscaler can start, name -> resources (None where its config states none,
    for the cloud to tell); None when no autoscaler config is known (a fixed cluster)."""
    import ray

    try:  # autoscaler v2 publishes its node types in the GCS; Ray Train and Data read them the same way
        config = ray._private.state.state.get_cluster_config()
    except AttributeError:  # a private API that a later Ray may move: then fall back to the v1 config
        config = None
    if config is not None and config.node_group_configs:
        return {group.name: dict(group.resources) for group in config.node_group_configs if group.max_count}
    path = Path(BOOTSTRAP_CONFIG).expanduser()  # autoscaler v1 (`ray up`): the config it runs with
    if not path.is_file():
        return None
    types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types") or {}
    return {name: node.get("resources") for name, node in types.items() if node.get("max_workers", 1)}


# ---- what a trial's machine must have ----------------------------------------------------------------

def site_problems(trials: list[tuple[str, TrialConfig]]) -> list[str]:
    """What this machine lacks for the trials, one message per distinct need (naming its field)."""
    failing: dict[str, list[str]] = {}
    checked: dict[tuple[Any, ...], str | None] = {}

    def need(key: tuple[Any, ...], check: Any, label: str) -> None:
        if key not in checked:
            checked[key] = check()
        if checked[key] is not None:
            failing.setdefault(checked[key], []).append(label)

    for label, config in trials:
        root = str(Path(config.data_root).expanduser())
        need(("data", config.dataset, root, config.resolution, config.celeba_split, config.download),
             lambda config=config: data_problem(config), label)
        if set(config.metric_names) & set(INCEPTION_METRICS):
            need(("weights", config.inception_weights),
                 lambda config=config: weights_problem(config.inception_weights), label)
        need(("cache_dir", config.cache_dir), lambda config=config: cache_dir_problem(config.cache_dir),
             label)
        need(("device", config.device), lambda config=config: device_problem(config.device), label)
    return labelled(failing, trials)


def data_problem(config: TrialConfig) -> str | None:
    from trainables.data import DatasetNotFoundError, sample_images

    try:
        sample_images(config.dataset, config.data_root, config.resolution, split=config.celeba_split)
    except DatasetNotFoundError as exc:
        if config.download and not Path(config.data_root).expanduser().is_file():
            return None  # each trial downloads it (download: true)
        return f"data_root: {exc}"
    except (OSError, ValueError, RuntimeError) as exc:  # unreadable, empty, undecodable, not of the format
        return f"data_root: dataset {config.dataset!r} at {config.data_root}: {exc}"
    return None


def weights_problem(inception_weights: str | None) -> str | None:
    from trainables.metrics.inception import (
        InceptionWeightsMissingError,
        check_inception_weights,
        resolve_inception_weights,
    )

    try:
        check_inception_weights(resolve_inception_weights(inception_weights))
    except (InceptionWeightsMissingError, OSError) as exc:
        return f"inception_weights: {exc}"
    return None


def cache_dir_problem(cache_dir: str) -> str | None:
    try:
        check_writable_folder(Path(cache_dir).expanduser(), "cache_dir")
    except StudyError as exc:
        return str(exc)
    return None


def device_problem(device: str) -> str | None:
    from trainables.config import ConfigError
    from trainables.trial import resolve_device

    try:
        resolve_device(device)
    except ConfigError as exc:
        return str(exc)
    return None


def check_on_worker(spec: StudySpec, missing_here: list[str]) -> tuple[str, list[str]]:
    """(node address, site_problems there) from one Ray task with a trial's resources, so that Ray places it
    where a trial could run; StudyError when no worker takes it within WORKER_CHECK_TIMEOUT_S."""
    import ray

    task = ray.remote(site_problems_on_this_node).options(num_cpus=spec.resources.cpus,
                                                          num_gpus=spec.resources.gpu or 0)
    result = task.remote(study_trials(spec))
    try:
        return ray.get(result, timeout=WORKER_CHECK_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(result, force=True)
        raise StudyError(refusal(spec, [
            f"resources: no node with {spec.resources.cpus:g} CPUs and {spec.resources.gpu or 0:g} GPU took "
            f"the check on a worker within {WORKER_CHECK_TIMEOUT_S:g} s, and this machine lacks: "
            + "; ".join(missing_here)])) from None


def site_problems_on_this_node(trials: list[tuple[str, TrialConfig]]) -> tuple[str, list[str]]:
    import ray

    return ray.util.get_node_ip_address(), site_problems(trials)
