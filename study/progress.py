"""Driver-side view of a running study: one line per ended trial, and the MLflow status of trials Ray ended.

A trial's own adapter closes its MLflow run after its final report (or, failed by a deterministic error, with
the error). Two endings never reach it: ASHA stopping the trial early (status `finished`, tag
`stopped_early=1`) and a failure after the last retry (`failed`, FAILURE_TAG `retries_spent`, the error).
No MLflow error leaves a callback (Tune would end the driver with it): a run this could not close waits in
`unclosed` for the driver's closing sweep (study/run.py), which waits out an outage of the server.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from study import layout
from study.tracking import find_trial_run, redacted


class TrialStatusCallback(tune.Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, total: int | None,
                 seeds: list[int]):
        self.tracking_uri = tracking_uri
        self.seeds = seeds  # a search's trials carry the repeat index, not the seed
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.total = total
        self.ended = 0
        self.unclosed: list[tuple[str, int, dict[str, str]]] = []  # (cell, seed, tags to close with)

    def __getstate__(self) -> dict[str, Any]:
        # Ray pickles its callbacks into the experiment's tuner.pkl. The tracking URI stays out of it (it may
        # hold a password, and the server may have moved by a --resume, which builds its own callback).
        return {**self.__dict__, "tracking_uri": None}

    def _close_run(self, trial: Any, tags: dict[str, str]) -> bool:
        """Close the trial's runs (a pack's: each member's) if the trial could not; True when it did."""
        closed = False
        for point, seed in self._members(trial):
            cell = layout.cell_key(point)
            try:
                closed |= close_trial_run(MlflowClient(self.tracking_uri), self.experiment_id,
                                          self.parent_run_id, cell, seed, tags)
            except Exception as exc:  # the server is down, or answers an error: the closing sweep retries
                self.unclosed.append((cell, seed, tags))
                print(f"warning: could not close the MLflow run of {cell or '(base)'} seed {seed} "
                      f"({redacted(str(exc)).splitlines()[0][:300]}); the study closes it at its end",
                      file=sys.stderr, flush=True)
        return closed

    def _member_outcomes(self, trial: Any) -> str:
        """`3 stable, 1 diverged`: the outcomes of a pack's members, as their MLflow runs say."""
        client = MlflowClient(self.tracking_uri)
        outcomes: Counter[str] = Counter()
        try:
            for point, seed in self._members(trial):
                cell = layout.cell_key(point)
                run_id = find_trial_run(client, self.experiment_id, self.parent_run_id, cell, seed)
                if run_id is not None:
                    run = client.get_run(run_id)
                    outcomes[layout.outcome(run.data.tags, run.info.status)] += 1
        except Exception as exc:  # the server is down: the runs still say, the line does not
            return f"ended (outcomes unread: {redacted(str(exc)).splitlines()[0][:200]})"
        return ", ".join(f"{outcomes[name]} {name}" for name in layout.OUTCOMES if outcomes[name])

    def _members(self, trial: Any) -> list[tuple[dict[str, Any], int]]:
        """(point, seed) of the trial, or of each member of a pack (a search's trial: its repeat index)."""
        repeat = trial.config.get("__trial_index__", 0)
        return [(member.get("point", {}), member.get("seed", self.seeds[repeat]))
                for member in trial.config.get("pack", [trial.config])]

    def _describe(self, trial: Any) -> str:
        described = [",".join([f"{name}={point[name]}" for name in sorted(point)] + [f"seed={seed}"])
                     for point, seed in self._members(trial)]
        return described[0] if len(described) == 1 else f"pack of {len(described)} [{'; '.join(described)}]"

    def _print(self, trial: Any, ending: str) -> None:
        self.ended += len(self._members(trial))
        result = trial.last_result or {}
        objective = None if result.get("failed") else result.get("objective")  # a failure's is a stand-in
        shown = f"objective {objective:.4g}" if isinstance(objective, int | float) else "no objective"
        cause = result.get("divergence_cause") or ""
        print(f"[{self.ended}/{self.total or '?'}] {self._describe(trial)}: {ending}"
              f"{' (' + cause + ')' if cause else ''}, {shown} at iteration {result.get('iteration', 0)}",
              flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"started {self._describe(trial)} ({trial.trial_id})", flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        print(f"  {self._describe(trial)}: iteration {result.get('iteration')}, objective "
              f"{result.get('objective', float('nan')):.4g}, {result.get('it_per_s', 0.0):.1f} it/s",
              flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result, members = trial.last_result or {}, len(self._members(trial))
        if result.get("failed"):  # a deterministic error: the trial closed its runs FAILED itself
            self._print(trial, f"FAILED, not retried: {str(result.get('error', ''))[:300]}")
        elif self._close_run(trial, {layout.STATUS_TAG: layout.FINISHED, layout.STOPPED_EARLY_TAG: "1"}):
            self._print(trial, "stopped early by the scheduler")
        elif members > 1:  # each member's outcome is on its own run
            self._print(trial, self._member_outcomes(trial))
        else:
            self._print(trial, result.get("outcome", "ended"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close_run(trial, {layout.STATUS_TAG: layout.FAILED, layout.OUTCOME_TAG: layout.FAILED,
                                layout.FAILURE_TAG: layout.RETRIES_SPENT,
                                layout.ERROR_TAG: ray_error(trial)})
        self._print(trial, "FAILED")


def close_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str, cell: str, seed: int,
                    tags: dict[str, str]) -> bool:
    """Close the trial's run with `tags` (STATUS_TAG among them) if it is still RUNNING; True when it was."""
    run_id = find_trial_run(client, experiment_id, parent_run_id, cell, seed)
    if run_id is None or client.get_run(run_id).data.tags.get(layout.STATUS_TAG) != layout.RUNNING:
        return False  # not started, or the trial closed it itself
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    client.set_terminated(run_id, layout.MLFLOW_END_STATUS[tags[layout.STATUS_TAG]])
    return True


def ray_error(trial: Any) -> str:
    """The last line of the error Ray recorded for a failed trial (its error.txt), for ERROR_TAG."""
    try:
        lines = Path(trial.error_file).read_text().strip().splitlines() if trial.error_file else []
    except OSError:
        lines = []
    return redacted(lines[-1] if lines else "the trial's process failed")[:layout.MAX_TAG_CHARS]
