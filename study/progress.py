"""Driver-side view of a running study: one line per ended trial, and the MLflow status of trials Ray ended.

A trial's own adapter closes its MLflow run after its final report. Two endings never reach it: ASHA stopping
the trial early (status `finished`, tag `stopped_early=1`) and a failure after the last retry (`failed`).
"""

from __future__ import annotations

from collections import Counter
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

    def _runs(self, trial: Any) -> list[tuple[MlflowClient, str]]:
        """The MLflow run id of the trial (a pack's: of each member) that has one, with the client."""
        client = MlflowClient(self.tracking_uri)
        found = (find_trial_run(client, self.experiment_id, self.parent_run_id, layout.cell_key(point), seed)
                 for point, seed in self._members(trial))
        return [(client, run_id) for run_id in found if run_id is not None]

    def _close_run(self, trial: Any, status: str) -> bool:
        """Close the trial's runs (a pack's: each member's) if the trial could not; True when it did."""
        closed = False
        for client, run_id in self._runs(trial):
            if client.get_run(run_id).data.tags.get(layout.STATUS_TAG) != layout.RUNNING:
                continue  # the trial closed it itself
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
        elif len(self._members(trial)) > 1:  # each member's outcome is on its own run
            outcomes = Counter(layout.outcome(run.data.tags, run.info.status)
                               for run in (client.get_run(run_id) for client, run_id in self._runs(trial)))
            self._print(trial, ", ".join(f"{outcomes[name]} {name}" for name in layout.OUTCOMES
                                         if outcomes[name]))
        else:
            self._print(trial, (trial.last_result or {}).get("outcome", "ended"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close_run(trial, layout.FAILED)
        self._print(trial, "FAILED")
