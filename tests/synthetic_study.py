"""Synthetic studies written into MLflow in study/'s layout (study/layout.py), for the analysis tests and
bench/analysis_collect.py: every value is chosen by the caller, so aggregates over a synthetic study are known
in advance. Test code only: nothing in study/, trainables/ or analysis/ imports it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.image import imsave
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from study import layout
from trainables.config import TrialConfig

BATCH_ENTRIES = 1000  # MLflow's log_batch limits per request: 1000 entries, of which at most 100 params
BATCH_PARAMS = 100


@dataclass
class SyntheticTrial:
    """One trial's results. Iterations are generator iterations; values are in the metric's units."""

    axes: dict[str, Any]  # swept TrialConfig fields of this trial, seed included: {"g_lr": 2e-4, "seed": 0}
    evals: Sequence[tuple[int, float]]  # (iteration, primary metric) at each evaluation, in order
    status: str = layout.FINISHED  # one of layout.TRIAL_STATUSES
    # OUTCOME_TAG, one of layout.OUTCOMES; None: what the trial would have (stable, diverged or failed as
    # its status; no tag while running)
    outcome: str | None = None
    divergence_cause: str = ""
    divergence_step: int = -1
    events: Sequence[dict[str, Any]] = ()  # content of events.json: {"cause", "iteration", "values", ...}
    extra_evals: dict[str, Sequence[tuple[int, float]]] = field(default_factory=dict)  # e.g. "is", "kid"
    diagnostics: dict[str, Sequence[tuple[int, float]]] = field(default_factory=dict)  # "sigma/blocks.0": ...
    start_ms: int = 1_700_000_000_000  # run start, ms since the epoch
    wall_time_s: float = 60.0
    config: dict[str, Any] = field(default_factory=dict)  # other TrialConfig fields (dataset, metrics, ...)
    bundles: dict[str, str] = field(default_factory=dict)  # bundle axes' labels ({"lr": "1e-3"}): cell tag
    samples: Sequence[int] = ()  # iterations whose sample grid (layout.SAMPLES_PATTERN) the trial logged


def sample_grid(seed: int, iteration: int) -> np.ndarray:
    """A real 64 x 64 RGB image standing for a trial's sample grid: 8 x 8 tiles whose colour encodes the
    seed (red) and the iteration (green), so a reader can tell which grid it was given."""
    tiles = np.indices((8, 8)).sum(axis=0) % 2
    rgb = np.stack([np.full((8, 8), seed / 10), np.full((8, 8), iteration / 1000), tiles * 0.5], axis=-1)
    return np.kron(rgb, np.ones((8, 8, 1))).clip(0, 1)


def write_study(
    client: MlflowClient,
    study: str,
    trials: Iterable[SyntheticTrial],
    *,
    axes: Sequence[str],
    parent_status: str = layout.FINISHED,
    experiment: str | None = None,
    workers: int = 4,
) -> str:
    """Write a study (parent run + one child run per trial) and return the parent run id.

    `axes` is the parent's `axes` tag (swept names, seed included). `workers` threads write trials at once.
    """
    name = experiment or study
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    parent = client.create_run(
        experiment_id,
        run_name=study,
        tags={
            layout.ROLE_TAG: layout.STUDY_ROLE,
            layout.STUDY_TAG: study,
            layout.PRESET_TAG: "",
            layout.GIT_COMMIT_TAG: "synthetic",
            layout.AXES_TAG: ",".join(axes),
            layout.STATUS_TAG: parent_status,
            f"{layout.VERSION_TAG_PREFIX}gan-stability": "0.1.0",
        },
    )
    parent_id = parent.info.run_id
    trials = list(trials)
    # The spec's params as study/ logs them: its name and each axis's values (bundles by label).
    values = [{**t.config, **t.axes, **t.bundles} for t in trials]
    swept = {axis: sorted({v[axis] for v in values if axis in v}, key=str) for axis in axes if axis != "seed"}
    spec = layout.flatten({"name": study, "axes": swept})
    client.log_batch(parent_id, params=[Param(key, value) for key, value in spec.items()])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(
            pool.map(
                lambda it: _write_trial(client, experiment_id, parent_id, study, it[0], it[1]),
                enumerate(trials),
            )
        )
    if parent_status != layout.RUNNING:
        client.set_terminated(parent_id, status=layout.MLFLOW_END_STATUS[parent_status])
    return parent_id


def _write_trial(
    client: MlflowClient, experiment_id: str, parent_id: str, study: str, index: int, trial: SyntheticTrial
) -> str:
    config = TrialConfig(**{**trial.config, **trial.axes})
    diverged = trial.status == layout.DIVERGED
    cell = layout.cell_key({**trial.axes, **trial.bundles})
    seed = trial.axes.get("seed", config.seed)
    tags = {
        layout.PARENT_RUN_ID_TAG: parent_id,
        layout.ROLE_TAG: layout.TRIAL_ROLE,
        layout.STUDY_TAG: study,
        layout.TRIAL_ID_TAG: f"trial_{index:05d}",
        layout.CELL_TAG: cell,
        layout.SEED_TAG: str(seed),
        layout.STATUS_TAG: trial.status,
        layout.DIVERGED_TAG: "1" if diverged else "0",
        layout.DIVERGENCE_CAUSE_TAG: trial.divergence_cause,
        layout.DIVERGENCE_STEP_TAG: str(trial.divergence_step),
    }
    outcome = trial.outcome or {layout.FINISHED: layout.STABLE}.get(trial.status, trial.status)
    if outcome != layout.RUNNING:
        tags[layout.OUTCOME_TAG] = outcome
    run = client.create_run(
        experiment_id, start_time=trial.start_ms, tags=tags,
        run_name=layout.trial_run_name({**trial.axes, **trial.bundles}, seed, config.variant),
    )
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in layout.flatten(config.model_dump(mode="json")).items()]

    ts = trial.start_ms
    penalty = config.divergence.diverged_objective
    metrics: list[Metric] = []
    for iteration, value in trial.evals:
        after = diverged and iteration >= trial.divergence_step
        metrics += [
            Metric(config.primary_metric, value, ts, iteration),
            Metric("objective", penalty if after else value, ts, iteration),
            Metric("iteration", iteration, ts, iteration),
            Metric("diverged", 1.0 if after else 0.0, ts, iteration),
        ]
    for key, points in {**trial.extra_evals, **trial.diagnostics}.items():
        metrics += [Metric(key, value, ts, iteration) for iteration, value in points]
    if trial.status in layout.ENDED_STATUSES:
        last = trial.divergence_step if diverged else (trial.evals[-1][0] if trial.evals else 0)
        if diverged:  # the final report of a stopped trial carries the penalty as its objective
            metrics += [
                Metric("objective", penalty, ts, last),
                Metric("diverged", 1.0, ts, last),
                Metric("iteration", last, ts, last),
            ]
        metrics += [
            Metric("done", 1.0, ts, last),
            Metric("events", float(len(trial.events)), ts, last),
            Metric("divergence_step", float(trial.divergence_step), ts, last),
        ]
    # Few requests: params ride along with the first metrics (MLflow takes 1000 entries, 100 params a batch).
    for start in range(0, len(params), BATCH_PARAMS):
        chunk = params[start : start + BATCH_PARAMS]
        head, metrics = metrics[: BATCH_ENTRIES - len(chunk)], metrics[BATCH_ENTRIES - len(chunk) :]
        client.log_batch(run_id, params=chunk, metrics=head)
    for start in range(0, len(metrics), BATCH_ENTRIES):
        client.log_batch(run_id, metrics=metrics[start : start + BATCH_ENTRIES])
    if trial.events:
        client.log_text(run_id, json.dumps(list(trial.events)), layout.EVENTS_ARTIFACT)
    with tempfile.TemporaryDirectory() as folder:
        for iteration in trial.samples:
            path = Path(folder) / layout.SAMPLES_PATTERN.replace("*", f"{iteration:07d}")
            path.parent.mkdir(exist_ok=True)
            imsave(path, sample_grid(seed, iteration), format="png")
            client.log_artifact(run_id, str(path), path.parent.name)
    if trial.status != layout.RUNNING:
        client.set_terminated(
            run_id,
            status=layout.MLFLOW_END_STATUS[trial.status],
            end_time=trial.start_ms + int(trial.wall_time_s * 1000),
        )
    return run_id


def reference_trials() -> list[SyntheticTrial]:
    """A 40-trial study over g_lr x beta1 x variant x seed (5 seeds) with hand-computed aggregates.

    Primary metric fd_digits, evaluated at iterations 500 (final + 10) and 1000 (final). Cells at beta1 = 0.5:

    | g_lr | variant | seeds                                              | median | rate | CI of median |
    | 1e-4 | sn      | finals 10, 12, 14, 16, 18                          | 14     | 0/5  | [10, 18]     |
    | 1e-4 | bsn     | 3 diverge (grad_explosion at 500, 700, 900); 20, 22 | 21     | 3/5  | [20, 22]     |
    | 2e-4 | sn      | all 5 diverge (nonfinite_loss at 100 ... 500)      | NaN    | 5/5  | NaN          |
    | 2e-4 | bsn     | finals 5, 6, 7; seed 3 running; seed 4 failed      | 6      | 0/3  | [5, 7]       |

    At beta1 = 0.0 every seed finishes with finals base + (0, 1, 2, 3, 4): base 30 (1e-4, sn), 40 (2e-4, sn),
    50 (1e-4, bsn), 60 (2e-4, bsn). Diverged trials evaluate once at iteration 250 (value 40) and carry one
    events.json event; the 1e-4/sn/0.5 trials log sigma and gradient-norm diagnostics every 50 iterations.
    Theory panel: the 1e-4/sn/0.5 trials' effective std equals its prediction (0.05) throughout and their
    sigma_conv is 1.5 x sigma_raw at each evaluation; the 1e-4/bsn/0.0 trials' std drifts from its prediction
    (0.04) to twice it by iteration 1000. Every trial logs a sample grid (`sample_grid`) at each evaluation.
    """
    trials = []

    def add(g_lr: float, beta1: float, variant: str, seed: int, final: float | None, **kwargs: Any) -> None:
        evals = [(500, final + 10), (1000, final)] if final is not None else [(250, 40.0)]
        trials.append(
            SyntheticTrial(
                axes={"g_lr": g_lr, "beta1": beta1, "variant": variant, "seed": seed},
                evals=evals,
                samples=[iteration for iteration, _ in evals],
                start_ms=1_700_000_000_000 + 1000 * len(trials),
                **kwargs,
            )
        )

    def diverge(cause: str, step: int) -> dict[str, Any]:
        event = {
            "cause": cause,
            "iteration": step,
            "values": {"grad_norm/D": 1e5},
            "thresholds": {"grad_explosion": 1e4},
            "action": "stop",
        }
        return {"status": "diverged", "divergence_cause": cause, "divergence_step": step, "events": [event]}

    steps = range(0, 1001, 50)
    diagnostics = {
        "sigma/blocks.0": [(i, 1.0 + i / 1000) for i in steps],
        "grad_norm/D/blocks.0": [(i, 0.1 + i / 10_000) for i in steps],
        "grad_norm/D": [(i, 0.5) for i in steps],
        "grad_norm/G": [(i, 0.7) for i in steps],
        "grad_norm/G/blocks.0": [(i, 0.2) for i in steps],
        "grad_x_real/mean": [(i, 0.3) for i in steps],
        "weight_std/blocks.0": [(i, 0.05) for i in steps],
        "weight_std_pred/blocks.0": [(i, 0.05) for i in steps],
        "sigma_raw/blocks.0": [(i, 2.0 + i / 1000) for i in steps],
        "sigma_eff/blocks.0": [(i, 1.0) for i in steps],
        "sigma_conv/blocks.0": [(i, 1.5 * (2.0 + i / 1000)) for i in (500, 1000)],
    }
    drifting = {
        "weight_std/blocks.0": [(i, 0.04 * (1 + i / 1000)) for i in steps],
        "weight_std_pred/blocks.0": [(i, 0.04) for i in steps],
    }
    for seed, final in enumerate((10, 12, 14, 16, 18)):
        add(
            1e-4,
            0.5,
            "sn",
            seed,
            final,
            diagnostics=diagnostics,
            extra_evals={"is": [(500, 2.0), (1000, 3.0 + seed)], "kid": [(500, 0.05), (1000, 0.01)]},
        )
    for seed, step in enumerate((500, 700, 900)):
        add(1e-4, 0.5, "bsn", seed, None, **diverge("grad_explosion", step))
    add(1e-4, 0.5, "bsn", 3, 20)
    add(1e-4, 0.5, "bsn", 4, 22)
    for seed in range(5):
        add(2e-4, 0.5, "sn", seed, None, **diverge("nonfinite_loss", 100 * (seed + 1)))
    for seed, final in enumerate((5, 6, 7)):
        add(2e-4, 0.5, "bsn", seed, final)
    trials.append(
        SyntheticTrial(
            axes={"g_lr": 2e-4, "beta1": 0.5, "variant": "bsn", "seed": 3},
            evals=[(500, 9.0)],
            status="running",
        )
    )
    add(2e-4, 0.5, "bsn", 4, 8, status="failed")
    for (g_lr, variant), base in {
        (1e-4, "sn"): 30,
        (2e-4, "sn"): 40,
        (1e-4, "bsn"): 50,
        (2e-4, "bsn"): 60,
    }.items():
        for seed in range(5):
            theory = {"diagnostics": drifting} if (g_lr, variant) == (1e-4, "bsn") else {}
            add(g_lr, 0.0, variant, seed, base + seed, **theory)
    return trials
