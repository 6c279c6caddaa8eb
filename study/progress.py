"""Driver-side view of a running study: one line per ended trial, and the MLflow status of trials Ray ended.

A trial's own adapter closes its MLflow run after its final report. Two endings never reach it: ASHA stopping
the trial early (status `finished`, tag `stopped_early=1`) and a failure after the last retry (`failed`).
"""

from __future__ import annotations

from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune

from study import layout
from study.tracking import find_trial_run


class TrialStatusCallback(tune.Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, total: int | None,
                 seeds: list[int]):
        self.tracking_uri = tracking_uri
        self.seeds = seeds  # a search's trials carry the repeat index, not the seed
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.total = total
        self.ended = 0

    def _close_run(self, trial: Any, status: str) -> bool:
        """Close the trial's runs (a pack's: each member's) if the trial could not; True when it did."""
        client = MlflowClient(self.tracking_uri)
        closed = False
        for point, seed in self._members(trial):
            cell = layout.cell_key(point)
            run_id = find_trial_run(client, self.experiment_id, self.parent_run_id, cell, seed)
            if run_id is None or client.get_run(run_id).data.tags.get(layout.STATUS_TAG) != layout.RUNNING:
                continue  # not started, or the trial closed it itself
            client.set_tag(run_id, layout.STATUS_TAG, status)
            if status == layout.FINISHED:
                client.set_tag(run_id, layout.STOPPED_EARLY_TAG, "1")
            client.set_terminated(run_id, layout.MLFLOW_END_STATUS[status])
            closed = True
        return closed

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
        objective = result.get("objective")
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
        if self._close_run(trial, layout.FINISHED):
            self._print(trial, "stopped early by the scheduler")
        else:
            result, members = trial.last_result or {}, len(self._members(trial))
            if members > 1:
                diverged = int(result.get("diverged", 0))
                self._print(trial, f"{members - diverged} finished, {diverged} diverged")
            else:
                self._print(trial, "diverged" if result.get("diverged") else "finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close_run(trial, layout.FAILED)
        self._print(trial, "FAILED")
