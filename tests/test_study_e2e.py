"""Small studies end to end on a real local Ray and a real MLflow server, read back with the MLflow client."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from study import layout
from study.run import main

REPOSITORY = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TINY_BASE = ("base: {dataset: digits, device: cpu, width: 0.125, batch_size: 16, iterations: %d, "
             "log_every: 5, eval_every: 10, checkpoint_every: 10, eval_generated: 100, eval_real: 100}\n")


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


@pytest.fixture(scope="module")
def small_study(ray_local, mlflow_server, tmp_path_factory):
    """The folder a two-trial study (variant none and sn, one seed, 20 iterations) ran in."""
    folder = tmp_path_factory.mktemp("e2e")
    spec = folder / "e2e.yaml"
    spec.write_text("name: e2e\n" + TINY_BASE % 20 + "axes:\n  variant: [none, sn]\nseeds: 1\n")
    argv = ["--study", str(spec), "--tracking-uri", mlflow_server, "--storage", str(folder / "ray")]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert main(argv) == 0
    return folder


@pytest.mark.slow
def test_small_study_writes_a_parent_run_and_one_child_run_per_trial(small_study, mlflow_server):
    folder = small_study

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("e2e")
    [parent] = client.search_runs([experiment.experiment_id], "tags.role = 'study'")
    assert parent.info.run_name == "e2e" and parent.info.status == "FINISHED"
    assert (parent.data.tags["status"], parent.data.tags["preset"], parent.data.tags["axes"]) == (
        "finished", "", "variant")
    assert parent.data.params["axes.variant"] == '["none", "sn"]'
    children = child_runs(client, experiment.experiment_id, parent.info.run_id)
    assert sorted(run.data.tags["cell"] for run in children) == ["variant=none", "variant=sn"]
    for run in children:
        tags, params = run.data.tags, run.data.params
        assert (tags["role"], tags["study"], tags["status"], run.info.status) == ("trial", "e2e", "finished",
                                                                                 "FINISHED")
        assert (tags["diverged"], tags["divergence_cause"], tags["divergence_step"]) == ("0", "", "-1")
        assert tags["outcome"] == "no_learning"  # 20 iterations: never better than one repeated image
        assert tags["trial_id"] and tags["node_id"]
        assert tags[layout.TORCH_THREADS_TAG] == "1"  # resources.cpus 1, whatever the worker's environment
        assert params["variant"] == tags["cell"].removeprefix("variant=") and params["iterations"] == "20"
        assert params["divergence.grad_explosion"] == "10000.0" and params["seed"] == "0"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss_d")] == [5, 10, 15, 20]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "objective")] == [10, 20]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "fd_digits")] == [10, 20]
        assert run.data.metrics["done"] == 1 and run.data.metrics["iteration"] == 20
        assert any(key.startswith("sigma/") for key in run.data.metrics) == (tags["cell"] == "variant=sn")
        samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
        assert samples == ["samples/iter_0000010.png", "samples/iter_0000020.png"]
        assert "events.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
        # what a reviewer reads first in MLflow's runs table
        assert run.info.run_name == f"{params['variant']} seed=0"
        assert (tags[layout.METRIC_TAG], tags[layout.SOURCE_NAME_TAG]) == ("fd_digits", "study/run.py")
        assert [m.value for m in client.get_metric_history(run.info.run_id, layout.PRIMARY_METRIC)] == [
            m.value for m in client.get_metric_history(run.info.run_id, "fd_digits")]
        [dataset] = run.inputs.dataset_inputs
        assert dataset.dataset.name == "digits (32 px)"
        assert [(t.key, t.value) for t in dataset.tags] == [("mlflow.data.context", "training")]
        assert any(key.startswith("weight_std_pred/") for key in run.data.metrics)  # the theory panel
    assert experiment.tags[layout.EXPERIMENT_KIND_TAG] == layout.EXPERIMENT_KIND
    view = json.loads(experiment.tags[layout.SHARED_VIEW_TAG_PREFIX + layout.REVIEW_VIEW])
    assert view["searchFilter"] == "tags.`role` = 'trial'" and "params.`variant`" in view["selectedColumns"]
    report = (folder / "reports" / "e2e" / "report.html").read_text()
    assert "<h2>Theory: the paper's predictions beside the measurements</h2>" in report
    assert report.count('<img alt="samples ') == 2  # one seed per cell: its best is its worst


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` binary on PATH (apt-get install -y chromium)")
def test_mlflow_ui_opens_the_review_view_on_the_trials_with_the_documented_columns(small_study,
                                                                                    mlflow_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    experiment = MlflowClient(mlflow_server).get_experiment_by_name("e2e")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 2400, "height": 1000})  # every column laid out
            page.goto(mlflow_server + layout.review_path(experiment.experiment_id))
            page.get_by_text("2 matching runs").wait_for(timeout=60_000)
            headers = set(page.locator("[role=columnheader]").all_inner_texts())
            names = page.locator("[role=gridcell] a", has_text="seed=0").all_inner_texts()
        finally:
            browser.close()
    # The columns README.md's "What a reviewer finds in MLflow" lists, the trials only, variant first.
    assert {"Run Name", "variant", "outcome", "status", "divergence_cause", "divergence_step", "metric",
            "primary_metric", "iteration"} <= headers
    assert sorted(names) == ["none seed=0", "sn seed=0"]


@pytest.mark.slow
def test_packed_study_runs_a_tune_trial_per_pack_and_an_mlflow_run_per_member(ray_local, mlflow_server,
                                                                              tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "packed.yaml"
    spec.write_text("name: packed\n" + TINY_BASE % 20 + "axes:\n  g_lr: [1.0e-4, 2.0e-4, 5.0e-4]\n"
                    "  variant: [sn, bsn]\nseeds: 1\npack_size: 3\n")
    argv = ["--study", str(spec), "--tracking-uri", mlflow_server, "--storage", str(tmp_path / "ray")]
    assert main(argv) == 0
    output = capsys.readouterr().out
    assert len(list((tmp_path / "ray").glob("packed-*/trial_*"))) == 2  # one Tune trial per variant

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("packed")
    [parent] = client.search_runs([experiment.experiment_id], "tags.role = 'study'")
    assert parent.data.tags["status"] == "finished"
    children = child_runs(client, experiment.experiment_id, parent.info.run_id)
    outcomes = [run.data.tags["outcome"] for run in children]  # each member's own, in the end line too
    assert "6 trials ended: " + ", ".join(f"{outcomes.count(o)} {o}" for o in layout.OUTCOMES) in output
    assert sorted(run.data.tags["cell"] for run in children) == sorted(
        f"g_lr={lr},variant={variant}" for lr in ("0.0001", "0.0002", "0.0005") for variant in ("bsn", "sn"))
    packs: dict[str, list] = {}
    for run in children:
        tags = run.data.tags
        packs.setdefault(tags["pack"], []).append(run)
        assert tags["trial_id"] == f"{tags['pack']}_{tags['pack_member']}"
        assert (tags["status"], run.info.status, tags["diverged"]) == ("finished", "FINISHED", "0")
        assert run.data.params["g_lr"] == tags["cell"].split(",")[0].removeprefix("g_lr=")
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss_d")] == [5, 10, 15, 20]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "objective")] == [10, 20]
        samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
        assert samples == ["samples/iter_0000010.png", "samples/iter_0000020.png"]
    assert sorted(sorted(run.data.tags["pack_member"] for run in members) for members in packs.values()) == [
        ["0", "1", "2"], ["0", "1", "2"]]
    for members in packs.values():  # a pack shares its variant; its members differ in g_lr
        assert len({run.data.params["variant"] for run in members}) == 1
        assert len({run.data.params["g_lr"] for run in members}) == 3


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


@pytest.mark.slow
def test_interrupted_study_resumes_with_no_trial_lost_or_duplicated(mlflow_server, tmp_path):
    spec = tmp_path / "resume.yaml"
    spec.write_text("name: resume\n" + TINY_BASE % 120 + "axes:\n  variant: [sn, bsn]\nseeds: 1\n"
                    "max_concurrent: 1\n")
    command = [sys.executable, str(REPOSITORY / "study" / "run.py"), "--study", str(spec), "--tracking-uri",
               mlflow_server, "--storage", str(tmp_path / "ray")]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    client = MlflowClient(mlflow_server)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)

        def checkpointed() -> bool:  # the first trial has logged past its first checkpoint
            experiment = client.get_experiment_by_name("resume")
            runs = client.search_runs([experiment.experiment_id], "tags.role = 'trial'") if experiment else []
            return any(run.data.metrics.get("iteration", 0) >= 30 for run in runs)

        try:
            wait_for(checkpointed, 240, "no trial reached iteration 30")
            first.send_signal(signal.SIGINT)  # Ray Tune saves the experiment state and stops
            assert first.wait(timeout=120) == 1
        finally:
            if first.poll() is None:
                first.kill()
    assert "continue with --resume" in (tmp_path / "first.log").read_text()
    experiment_id = client.get_experiment_by_name("resume").experiment_id
    [parent] = client.search_runs([experiment_id], "tags.role = 'study'")
    assert (parent.data.tags["status"], parent.info.status) == ("killed", "KILLED")  # Ctrl+C closed it
    interrupted = child_runs(client, experiment_id, parent.info.run_id)
    assert any((run.data.tags["status"], run.info.status) == ("killed", "KILLED") for run in interrupted)

    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=480)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    [parent] = client.search_runs([experiment_id], "tags.role = 'study'")
    assert parent.data.tags["status"] == "finished"
    children = child_runs(client, experiment_id, parent.info.run_id)
    assert sorted(run.data.tags["cell"] for run in children) == ["variant=bsn", "variant=sn"]
    for run in children:
        # A divergence (tiny nets do vanish) ends a trial early, as a result: its steps stop there.
        assert run.data.tags["status"] in ("finished", "diverged") and run.data.metrics["done"] == 1
        last = 120 if run.data.tags["status"] == "finished" else int(run.data.tags["divergence_step"])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss_d")]
        assert steps == list(range(5, last + 1, 5))  # every step once: none lost, none logged twice
