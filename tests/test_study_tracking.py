"""MLflow for studies, against a real `mlflow server`: child runs that resume without duplicate steps."""

from __future__ import annotations

import time

import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient

from study.spec import StudyError, load_spec
from study.tracking import (
    TrialRun,
    check_storage,
    check_tracking_uri,
    create_parent_run,
    study_experiment,
)


class Study:
    """A fresh experiment with a parent run on the test's MLflow server; opens its trials' runs."""

    def __init__(self, server: str):
        self.client = MlflowClient(server)
        self.experiment_id = self.client.create_experiment(f"study-{time.time_ns()}")
        self.parent = self.client.create_run(self.experiment_id).info.run_id

    def open(self, trial_id: str, seed: str = "0", cell: str = "c") -> TrialRun:
        return TrialRun.open(self.client, self.experiment_id, self.parent, trial_id, run_name="r",
                             tags={"cell": cell, "seed": seed}, params={"variant": "sn"})


def test_unreachable_tracking_server_is_refused_naming_the_timeout():
    match = r"--tracking-uri http://127.0.0.1:\d+: no MLflow server answered within 3 s"
    with pytest.raises(StudyError, match=match):
        check_tracking_uri(f"http://127.0.0.1:{free_port()}", timeout=3)


def test_unknown_tracking_scheme_lists_the_valid_ones():
    with pytest.raises(StudyError, match="unsupported scheme 'ftp'; valid: sqlite:///PATH, http"):
        check_tracking_uri("ftp://host/x")


def test_storage_under_a_file_is_refused(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StudyError, match="--storage .*a-file/runs: .*a-file is not a folder"):
        check_storage(str(tmp_path / "a-file" / "runs"))


def test_parent_run_carries_role_preset_axes_versions_and_the_spec(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    spec, _ = load_spec("default", ["name=parent-test"])
    experiment_id = study_experiment(client, spec)
    run_id = create_parent_run(client, experiment_id, spec, "default", str(tmp_path / "ray"), tmp_path)
    run = client.get_run(run_id)
    assert client.get_experiment(experiment_id).name == "parent-test"
    assert run.info.run_name == "parent-test"
    tags = run.data.tags
    assert (tags["role"], tags["study"], tags["preset"], tags["status"]) == (
        "study", "parent-test", "default", "running")
    assert tags["axes"] == "lr,beta1,variant,seed"
    versions = {"version.torch", "version.ray", "version.mlflow", "version.optuna", "version.gan-stability"}
    assert versions <= set(tags)
    assert tags["git_commit"] == "unknown"  # tmp_path is no git checkout
    assert run.data.params["base.iterations"] == str(spec.base["iterations"])
    assert run.data.params["axes.beta1"] == "[0.0, 0.5]"
    assert [artifact.path for artifact in client.list_artifacts(run_id)] == ["spec.yaml"]


def test_a_resumed_trial_run_never_logs_a_step_twice(mlflow_server):
    study = Study(mlflow_server)
    client = study.client
    first = study.open("t_0001")
    for step in (10, 20, 30):  # the crashed attempt logged step 30 after its checkpoint at 20
        assert first.log_report({"iteration": step, "loss_d": float(step), "divergence_cause": ""})
    # No run id in hand (no checkpoint yet), even a new Tune trial id (a driver restored from an older
    # snapshot of Tune's state): the trial's run is found again by its cell and seed.
    again = study.open("t_0009")
    assert again.run_id == first.run_id and again.last_step == 30
    logged = [again.log_report({"iteration": step, "loss_d": -1.0}) for step in (30, 40)]
    assert logged == [False, True]
    history = client.get_metric_history(first.run_id, "loss_d")
    assert [(m.step, m.value) for m in history] == [(10, 10.0), (20, 20.0), (30, 30.0), (40, -1.0)]
    assert "divergence_cause" not in client.get_run(first.run_id).data.metrics  # strings are not metrics


def test_finish_tags_a_divergence_as_a_result_not_a_failure(mlflow_server):
    study = Study(mlflow_server)
    client, parent = study.client, study.parent
    run = study.open("t_0002")
    run.finish({"iteration": 70, "diverged": 1, "divergence_cause": "grad_explosion", "divergence_step": 70})
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED"
    keys = ("status", "diverged", "divergence_cause", "divergence_step", "role", "mlflow.parentRunId")
    assert {key: finished.data.tags[key] for key in keys} == {
        "status": "diverged", "diverged": "1", "divergence_cause": "grad_explosion", "divergence_step": "70",
        "role": "trial", "mlflow.parentRunId": parent}


def test_an_ended_trial_run_is_not_reopened_and_hands_back_its_final_result(mlflow_server):
    study = Study(mlflow_server)
    client = study.client
    run = study.open("t_0003", seed="1")
    final = {"iteration": 70, "objective": 1e4, "diverged": 1, "divergence_cause": "nan_loss",
             "divergence_step": 65, "done": 1}
    run.log_report(final)
    run.finish(final)
    ended_at = client.get_run(run.run_id).info.end_time

    # Restored from a snapshot of Tune's state older than its end: the same run, left as it ended.
    again = study.open("t_0004", seed="1")
    assert again.run_id == run.run_id
    assert again.ended
    after = client.get_run(run.run_id)
    assert (after.info.status, after.info.end_time, after.data.tags["status"]) == ("FINISHED", ended_at,
                                                                                  "diverged")
    result = again.final_result()
    expected = {"iteration": 70, "objective": 1e4, "diverged": 1, "divergence_cause": "nan_loss",
                "divergence_step": 65}
    assert {key: result[key] for key in expected} == expected


def test_a_trial_whose_cell_holds_a_quote_finds_its_run_again(mlflow_server):
    study = Study(mlflow_server)
    first = study.open("t_0005", cell="setting=miyato's B")
    assert first.log_report({"iteration": 10, "loss_d": 1.0})
    again = study.open("t_0006", cell="setting=miyato's B")
    assert again.run_id == first.run_id and again.last_step == 10
