"""MLflow for studies, against a real `mlflow server`: child runs that resume without duplicate steps, are
created once per key, fail with their message; URIs shown without passwords; the state `--resume` trusts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from study import layout
from study.run import spec_changes
from study.spec import StudyError, load_spec
from study.tracking import (
    TrackingGuard,
    TrackingOutage,
    TrialRun,
    check_storage,
    check_tracking_uri,
    close_runs_of_dead_drivers,
    create_parent_run,
    driver_alive,
    driver_identity,
    read_study_state,
    redacted,
    study_experiment,
    write_study_state,
)

REPOSITORY = Path(__file__).resolve().parent.parent
PASSWORD = "-".join(("hunter2", "Zq9"))  # put into URIs by the tests: never a URI with it in the repository


class Study:
    """A fresh experiment with a parent run on the test's MLflow server; opens its trials' runs."""

    def __init__(self, server: str):
        self.client = MlflowClient(server)
        self.experiment_id = self.client.create_experiment(f"study-{time.time_ns()}")
        self.parent = self.client.create_run(self.experiment_id).info.run_id

    def open(self, trial_id: str, seed: str = "0", cell: str = "c",
             params: dict[str, str] | None = None) -> TrialRun:
        return TrialRun.open(self.client, self.experiment_id, self.parent, trial_id, run_name="r",
                             tags={"cell": cell, "seed": seed}, params=params or {"variant": "sn"})


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
    run.finish({"iteration": 70, "diverged": 1, "outcome": "diverged", "divergence_cause": "grad_explosion",
                "divergence_step": 70})
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED"
    keys = ("status", "outcome", "diverged", "divergence_cause", "divergence_step", "role",
            "mlflow.parentRunId")
    assert {key: finished.data.tags[key] for key in keys} == {
        "status": "diverged", "outcome": "diverged", "diverged": "1", "divergence_cause": "grad_explosion",
        "divergence_step": "70", "role": "trial", "mlflow.parentRunId": parent}


def test_an_ended_trial_run_is_not_reopened_and_hands_back_its_final_result(mlflow_server):
    study = Study(mlflow_server)
    client = study.client
    run = study.open("t_0003", seed="1")
    final = {"iteration": 70, "objective": 1e4, "diverged": 1, "outcome": "diverged",
             "divergence_cause": "nonfinite_loss", "divergence_step": 65, "done": 1}
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
    expected = {"iteration": 70, "objective": 1e4, "diverged": 1, "outcome": "diverged",
                "divergence_cause": "nonfinite_loss", "divergence_step": 65}
    assert {key: result[key] for key in expected} == expected


def test_a_trial_whose_cell_holds_a_quote_finds_its_run_again(mlflow_server):
    study = Study(mlflow_server)
    first = study.open("t_0005", cell="setting=miyato's B")
    assert first.log_report({"iteration": 10, "loss_d": 1.0})
    again = study.open("t_0006", cell="setting=miyato's B")
    assert again.run_id == first.run_id and again.last_step == 10


# ---- exactly once: a retried create_run, a failed trial --------------------------------------------------

def test_a_create_run_committed_twice_by_a_retried_request_leaves_one_run_and_deletes_the_empty_twin(
        mlflow_server):
    study = Study(mlflow_server)
    client = study.client
    key = layout.trial_run_key(study.parent, "c", "0")
    # What a create_run whose reply was lost leaves: the server committed it, the client's retry made another.
    twins = [client.create_run(study.experiment_id, tags={layout.RUN_KEY_TAG: key, "cell": "c", "seed": "0"})
             for _ in range(2)]
    run = study.open("t_0010")
    assert run.run_id == min(twins, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
    active = client.search_runs([study.experiment_id], f"tags.run_key = '{key}'")
    deleted = client.search_runs([study.experiment_id], f"tags.run_key = '{key}'", ViewType.DELETED_ONLY)
    assert [r.info.run_id for r in active] == [run.run_id] and len(deleted) == 1
    assert client.get_run(run.run_id).data.params == {"variant": "sn"}  # the kept run got the params


def test_a_twin_that_holds_data_is_kept_over_an_earlier_empty_one(mlflow_server):
    study = Study(mlflow_server)
    client = study.client
    key = layout.trial_run_key(study.parent, "c", "1")
    empty, logged = (client.create_run(study.experiment_id, tags={layout.RUN_KEY_TAG: key}) for _ in range(2))
    client.log_param(logged.info.run_id, "variant", "sn")
    assert study.open("t_0011", seed="1").run_id == logged.info.run_id
    assert client.get_run(empty.info.run_id).info.lifecycle_stage == "deleted"


def test_a_failed_trial_run_holds_its_message_and_traceback_and_is_final(mlflow_server, tmp_path):
    study = Study(mlflow_server)
    client = study.client
    run = study.open("t_0012", seed="2")
    run.fail("ImageDecodeError: imagefolder: cannot decode /data/x.png", "Traceback ...\nImageDecodeError")
    failed = client.get_run(run.run_id)
    assert failed.info.status == "FAILED"
    assert (failed.data.tags["status"], failed.data.tags["failure"]) == ("failed", "deterministic")
    assert failed.data.tags["error"] == "ImageDecodeError: imagefolder: cannot decode /data/x.png"
    text = Path(client.download_artifacts(run.run_id, "error.txt", str(tmp_path))).read_text()
    assert text.endswith("ImageDecodeError")
    again = study.open("t_0013", seed="2")  # restored from an older snapshot: not reopened, not run again
    assert again.ended and client.get_run(run.run_id).info.status == "FAILED"
    assert again.final_result()["failed"] == 1


def test_a_continued_run_names_every_param_that_differs_either_way(mlflow_server):
    study = Study(mlflow_server)
    first = study.open("t_0014", seed="3", params={"variant": "sn", "n_dis": "2"})
    again = study.open("t_0015", seed="3", params={"variant": "sn", "scale": "1.5"})
    assert again.run_id == first.run_id
    assert again.differing_params({"variant": "sn", "scale": "1.5"}) == ["n_dis", "scale"]


# ---- outages: waited out, bounded; other errors at once -------------------------------------------------

def test_the_guard_waits_for_a_server_that_stays_down_then_fails_naming_the_setting(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the client's own retries: none
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}"
    said = []
    guard = TrackingGuard(uri, wait_s=3, say=said.append)
    waited = r"did not answer /health within 3 s \(tracking.outage_wait_s\)"
    with pytest.raises(TrackingOutage, match=waited) as info:
        guard(MlflowClient(uri).get_run, "0" * 32)
    assert PASSWORD not in str(info.value) and said and PASSWORD not in said[0]


def test_the_guard_raises_an_error_of_a_server_that_answers_at_once(mlflow_server):
    said = []
    with pytest.raises(MlflowException, match="Run .* not found"):
        guard = TrackingGuard(mlflow_server, wait_s=600, say=said.append)
        guard(MlflowClient(mlflow_server).get_run, "0" * 32)
    assert said == []


# ---- secrets: URIs shown without their passwords; bad URIs refused --------------------------------------

@pytest.mark.parametrize(("uri", "shown"), [
    ("postgresql://mlflow:{pw}@db.internal:5432/mlflow", "postgresql://mlflow:***@db.internal:5432/mlflow"),
    ("s3://AKIDEXAMPLE:{pw}@bucket/ray", "s3://AKIDEXAMPLE:***@bucket/ray"),
    ("http://alice:{pw}@[::1]:5000", "http://alice:***@[::1]:5000"),
    ("cannot reach https://bob:{pw}@host/x (refused)", "cannot reach https://bob:***@host/x (refused)"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/a:b@c/mlflow.db", "sqlite:////tmp/a:b@c/mlflow.db"),
])
def test_redacted_hides_the_password_of_every_uri_and_nothing_else(uri, shown):
    assert redacted(uri.format(pw=PASSWORD)) == shown.replace("{pw}", PASSWORD)


def test_a_health_probe_with_credentials_in_the_uri_asks_the_host_and_never_echoes_the_password(
        mlflow_server):
    check_tracking_uri(mlflow_server.replace("http://", f"http://alice:{PASSWORD}@"))  # answers: no error
    closed = f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}"
    with pytest.raises(StudyError) as info:
        check_tracking_uri(closed, timeout=3)
    assert "--tracking-uri http://alice:***@127.0.0.1:" in str(info.value) and PASSWORD not in str(info.value)


@pytest.mark.parametrize(("uri", "named"), [
    ("http://127.0.0.1:abc", "not a valid URI (Port could not be cast to integer value as 'abc')"),
    ("http://[::1", "not a valid URI (Invalid IPv6 URL)"),
    ("http://alice:{pw}@host:abc", "--tracking-uri http://alice:***@host:abc: not a valid URI"),
    ("postgresql://mlflow:{pw}@:5432/db", "no host"),
])
def test_a_uri_urllib_cannot_parse_is_refused_naming_it_without_its_password(uri, named):
    with pytest.raises(StudyError) as info:
        check_tracking_uri(uri.format(pw=PASSWORD))
    assert named in str(info.value) and PASSWORD not in str(info.value)


def test_the_parent_run_holds_no_credential_in_params_tags_or_spec_yaml(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    overrides = ["name=secret-parent", f"tracking.uri=postgresql://mlflow:{PASSWORD}@db:5432/mlflow",
                 f"storage=s3://AKIDEXAMPLE:{PASSWORD}@bucket/ray"]
    spec, _ = load_spec("default", overrides)
    experiment_id = study_experiment(client, spec)
    run_id = create_parent_run(client, experiment_id, spec, "default", f"{spec.storage}/x", tmp_path)
    run = client.get_run(run_id)
    text = Path(client.download_artifacts(run_id, "spec.yaml", str(tmp_path))).read_text()
    assert PASSWORD not in json.dumps([run.data.params, run.data.tags]) + text
    assert run.data.params["storage"] == "s3://AKIDEXAMPLE:***@bucket/ray"
    assert yaml.safe_load(text)["tracking"]["uri"] == "postgresql://mlflow:***@db:5432/mlflow"


# ---- what --resume trusts: the state file, the spec both ways ------------------------------------------

def test_spec_changes_name_a_removed_an_added_and_a_changed_key():
    before = {"base.n_dis": "2", "base.iterations": "300", "seeds": "[0]"}
    now = {"base.iterations": "400", "seeds": "[0]", "base.variant": "sn"}
    assert spec_changes(before, now) == ["base.iterations (300 -> 400)", "base.n_dis (2 -> unset)",
                                         "base.variant (unset -> sn)"]
    assert spec_changes(before, dict(before)) == []


def test_the_state_file_names_the_study_s_own_folder_and_nothing_else(tmp_path):
    spec, _ = load_spec("default", ["name=stateful"])
    storage = tmp_path / "runs"
    write_study_state(str(storage), spec, "stateful-20260101-120000-0123abcd", "a" * 32)
    state = read_study_state(str(storage), "stateful")
    assert (state["ray_folder"], state["parent_run_id"]) == ("stateful-20260101-120000-0123abcd", "a" * 32)
    assert read_study_state(str(storage), "never-started") is None
    state_file = storage / "stateful.study.json"
    for folder in ("../elsewhere", "/tmp/evil", "other-20260101-120000-0123abcd", "stateful"):
        state_file.write_text(json.dumps({**state, "ray_folder": folder}))
        with pytest.raises(StudyError, match="names Ray folder .*, not one of study 'stateful'"):
            read_study_state(str(storage), "stateful")
    (tmp_path / "outside").mkdir()
    (storage / "stateful-20260101-120000-0123abcd").symlink_to(tmp_path / "outside")
    state_file.write_text(json.dumps(state))
    with pytest.raises(StudyError, match="leads out of storage"):
        read_study_state(str(storage), "stateful")
    state_file.write_text("{not json")
    with pytest.raises(StudyError, match="is not a study state file"):
        read_study_state(str(storage), "stateful")


def test_a_driver_is_alive_while_its_process_runs_and_unknown_on_another_host():
    assert driver_alive(driver_identity()) is True
    assert driver_alive(dead_driver_identity()) is False
    host, pid, start = driver_identity().split(":")
    assert driver_alive(f"{host}:{pid}:{int(start) + 1}") is False  # the pid reused by a later process
    assert driver_alive(f"another-host:{os.getpid()}:1") is None


def dead_driver_identity() -> str:
    """DRIVER_TAG of a process that ran on this machine and has ended."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    identity = driver_identity().rsplit(":", 2)[0] + f":{child.pid}:" + Path(
        f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    child.kill()
    child.wait()
    return identity


def test_a_later_start_closes_the_runs_a_dead_driver_left_running_and_no_live_driver_s(mlflow_server):
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"dead-driver-{time.time_ns()}")
    drivers = {"dead": dead_driver_identity(), "alive": driver_identity(), "elsewhere": "other-host:1:1"}
    parents, trials = {}, {}
    for name, identity in drivers.items():
        tags = {"role": "study", "study": "s", "status": "running", "driver": identity}
        parents[name] = client.create_run(experiment, tags=tags).info.run_id
        trials[name] = client.create_run(experiment, tags={"role": "trial", "status": "running",
                                                          "mlflow.parentRunId": parents[name]}).info.run_id
    assert close_runs_of_dead_drivers(client, experiment, "s") == [parents["dead"]]
    for name in drivers:
        for run_id in (parents[name], trials[name]):
            run = client.get_run(run_id)
            expected = ("killed", "KILLED") if name == "dead" else ("running", "RUNNING")
            assert (run.data.tags["status"], run.info.status) == expected, name


# ---- two first starts on a new sqlite database ----------------------------------------------------------

TWIN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from study.spec import load_spec
    from study.tracking import study_experiment, tracking_client
    uri, go = sys.argv[1], Path(sys.argv[2])
    spec, _ = load_spec("default", ["name=twins"])
    while not go.exists():  # both processes past their imports: the race is on the schema alone
        time.sleep(0.05)
    client = tracking_client(uri)
    print(study_experiment(client, spec), client.create_run(study_experiment(client, spec)).info.run_id)
""")


@pytest.mark.slow
def test_two_first_starts_on_a_new_sqlite_database_both_succeed_and_leave_it_whole(tmp_path):
    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    twins = [subprocess.Popen([sys.executable, "-c", TWIN, uri, str(go)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(1)
    go.touch()
    outputs = [twin.communicate(timeout=300) for twin in twins]
    assert [twin.returncode for twin in twins] == [0, 0], [err[-2000:] for _, err in outputs]
    experiments = {out.split()[0] for out, _ in outputs}
    runs = {out.split()[1] for out, _ in outputs}
    assert len(experiments) == 1 and len(runs) == 2  # one experiment, a run each
    client = MlflowClient(uri)  # the schema is whole: a later client reads and writes it
    assert len(client.search_runs(list(experiments))) == 2


def test_trials_starting_together_each_get_their_shared_dataset_as_an_input(mlflow_server):
    """Eight trial runs opened at once with the same new dataset: MLflow's dataset row is created by one, and
    each run links it (a lost race to create it is an integrity error on the server, retried)."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from study.adapter import dataset_input
    from trainables.config import parse_config

    study = Study(mlflow_server)
    dataset = dataset_input(parse_config({"dataset": "digits"}))
    start = Barrier(8)

    def open_trial(k: int) -> str:
        start.wait()
        return TrialRun.open(study.client, study.experiment_id, study.parent, f"t_{k}", run_name="r",
                             tags={"cell": f"c{k}", "seed": "0"}, params={"variant": "sn"},
                             datasets=[dataset]).run_id

    with ThreadPoolExecutor(8) as pool:
        run_ids = list(pool.map(open_trial, range(8)))
    for run_id in run_ids:
        inputs = study.client.get_run(run_id).inputs.dataset_inputs
        assert [entry.dataset.name for entry in inputs] == ["digits (32 px)"]
