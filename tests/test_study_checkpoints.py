"""Checkpoint retention on a real local Ray Tune run: a checkpoint that a snapshot of the experiment state
names is never deleted (a driver killed at any moment can resume), and at the end only the last is left."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray import tune

from study.tuning import CheckpointRetention

REPORTS = 60


class SnapshotProbe(tune.Callback):
    """Checks, between any two of Tune's steps, that what the last snapshot named is on disk."""

    def __init__(self) -> None:
        self.named: dict[str, str] = {}
        self.snapshots = 0
        self.checks = 0
        self.missing: list[str] = []

    def get_state(self) -> None:  # Tune calls it right after writing a snapshot of the experiment state
        self.snapshots += 1
        self.named = {trial.trial_id: trial.checkpoint.path
                      for trial in getattr(self, "trials", []) if trial.checkpoint is not None}

    def _check(self) -> None:
        self.checks += 1
        self.missing += [path for path in self.named.values() if not Path(path).is_dir()]

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self.trials = trials
        self._check()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._check()

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        self._check()


def test_no_named_checkpoint_is_ever_deleted_and_only_the_last_remains(ray_local, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0.3")  # many snapshots, many checkpoints between two
    probe = SnapshotProbe()

    def reporting_every_step(config: dict[str, Any]) -> None:  # local: Ray's workers get it by value
        for step in range(1, REPORTS + 1):
            folder = Path(tune.get_context().get_trial_dir()) / "work" / f"step_{step}"
            folder.mkdir(parents=True)
            (folder / "state.txt").write_text(str(step))
            tune.report({"step": step}, checkpoint=tune.Checkpoint.from_directory(str(folder)))
            time.sleep(0.02)

    tuner = tune.Tuner(
        reporting_every_step, param_space={"trial": tune.grid_search([0, 1])},
        run_config=tune.RunConfig(name="retention", storage_path=str(tmp_path), verbose=0,
                                  callbacks=[CheckpointRetention(), probe],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=None)),
    )
    results = tuner.fit()
    assert not results.errors
    assert probe.snapshots >= 5 and probe.checks > 2 * REPORTS
    assert probe.missing == []
    for result in results:
        folders = sorted(path.name for path in Path(result.path).glob("checkpoint_*"))
        assert folders == [f"checkpoint_{REPORTS - 1:06d}"]
        assert (Path(result.checkpoint.path) / "state.txt").read_text() == str(REPORTS)
