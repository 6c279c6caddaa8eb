"""Tracking and resume under faults injected for real: `study/run.py` as its own process on its own local Ray,
real `mlflow server` processes, a real proxy on 127.0.0.1, real signals.

- A parent's `ray_experiment` tag pointed at a crafted tuner.pkl (an unauthenticated set-tag): nothing runs.
- A key removed from the spec (or added, or changed) before `--resume`: refused, naming it.
- Credentials in the tracking URI: nowhere in the output, the parent run, spec.yaml or the study's storage.
- The reply of a trial's runs/create lost: one run per trial; an empty run is skipped and named by analysis.
- The tracking server down far longer than the client's own retries: trials wait, Ray retries nothing.
- Ctrl+C: every run KILLED; then the server moved to another port: `--resume` there finishes the study.
- Two first starts of one study at once on a new sqlite database: both finish, apart, the database whole.
- A deterministic error (an undecodable image): one attempt, the run FAILED with the message, exit code 1.
Killed here, by process id, only processes these tests started.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import pickle
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, kill_mlflow_server, start_mlflow_server, wait_for_http
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.datasets import load_digits
from test_reliability_faults import (
    REPOSITORY,
    TINY_BASE,
    Study,
    assert_every_step_once,
    descendants,
    kill_all,
    trial_runs,
    wait_for,
)

from analysis.collect import collect
from study.run import main as study_main

PASSWORD = "-".join(("pw", os.urandom(6).hex()))  # a fresh secret per session, never in the repository


def parent_runs(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], "tags.role = 'study'") if experiment else []


def ray_trial_folders(storage: Path) -> list[Path]:
    return sorted(storage.glob("*/trial_*"))


# ---- a finished study, tracked with credentials in its URI ------------------------------------------------

FINISHED_SPEC = "name: finished\n" + TINY_BASE.replace("}", ", n_dis: 2}") % 20 + "seeds: 1\n"


@pytest.fixture(scope="module")
def finished(mlflow_server, tmp_path_factory):
    """A one-trial study run to its end, its tracking URI holding a user and PASSWORD."""
    folder = tmp_path_factory.mktemp("finished")
    uri = mlflow_server.replace("http://", f"http://alice:{PASSWORD}@")
    study = Study(folder, FINISHED_SPEC, uri)
    try:
        study.start()
        assert study.wait(timeout=420) == 0, study.output()
    finally:
        study.stop()
    return study


@pytest.mark.slow
def test_no_credential_reaches_the_output_the_parent_run_spec_yaml_or_the_storage(finished, mlflow_server,
                                                                                    tmp_path):
    output = finished.output()
    port = mlflow_server.rsplit(":", 1)[1]
    assert PASSWORD not in output and f"at http://alice:***@127.0.0.1:{port}" in output
    client = MlflowClient(mlflow_server)
    [parent] = parent_runs(client, "finished")
    spec_yaml = Path(client.download_artifacts(parent.info.run_id, "spec.yaml", str(tmp_path))).read_text()
    assert PASSWORD not in json.dumps([parent.data.params, parent.data.tags]) + spec_yaml
    stored = [path for path in (finished.folder / "ray").rglob("*") if path.is_file()]
    assert stored and not [path for path in stored if PASSWORD.encode() in path.read_bytes()]  # tuner.pkl too


@pytest.mark.slow
@pytest.mark.parametrize(("edit", "named"), [
    (lambda text: text.replace(", n_dis: 2", ""), "base.n_dis (2 -> unset)"),  # a key removed
    (lambda text: text.replace("seeds: 1\n", "seeds: 1\nmax_concurrent: 1\n"), "max_concurrent (null -> 1)"),
    (lambda text: text.replace("iterations: 20", "iterations: 30"), "base.iterations (20 -> 30)"),
], ids=["removed", "added", "changed"])
def test_resume_with_a_key_removed_added_or_changed_is_refused_naming_it(finished, capsys, edit, named):
    spec = finished.folder / "edited.yaml"
    spec.write_text(edit(FINISHED_SPEC))
    argv = [arg if arg != str(finished.spec) else str(spec) for arg in finished.command("--resume")[2:]]
    assert study_main(argv) == 2
    err = capsys.readouterr().err
    assert "--resume: the spec differs from the one study 'finished' started with in" in err and named in err


class Payload:
    """Unpickled, it runs `touch SENTINEL` (in the process that unpickles it)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def set_tag(uri: str, run_id: str, key: str, value: str) -> None:
    """What anyone who reaches an MLflow server without authentication can do: POST runs/set-tag."""
    body = json.dumps({"run_id": run_id, "key": key, "value": value}).encode()
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/runs/set-tag", body,
                                     {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()


@pytest.mark.slow
def test_a_ray_experiment_tag_set_by_anyone_runs_nothing_on_resume(finished, mlflow_server, tmp_path):
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil-experiment"
    evil.mkdir()
    (evil / "tuner.pkl").write_bytes(pickle.dumps(Payload(sentinel)))
    pickle.loads((evil / "tuner.pkl").read_bytes())  # live: what Ray's Tuner.restore does with it runs it
    assert sentinel.exists()
    sentinel.unlink()
    client = MlflowClient(mlflow_server)
    [parent] = parent_runs(client, "finished")
    set_tag(mlflow_server, parent.info.run_id, "ray_experiment", str(evil))
    # A newer parent run of the same study, also naming the crafted folder: not the study's either.
    experiment = client.get_experiment_by_name("finished").experiment_id
    client.create_run(experiment, tags={"role": "study", "study": "finished", "ray_experiment": str(evil)})

    finished.start("--resume")
    assert finished.wait(timeout=420) == 0, finished.output()
    assert not sentinel.exists()
    [folder] = [path.name for path in (finished.folder / "ray").iterdir() if path.is_dir()]
    assert f"parent run {parent.info.run_id} " in finished.logs[-1].read_text()
    assert f"Ray results in {finished.folder / 'ray' / folder}" in finished.logs[-1].read_text()


# ---- a lost reply to a trial's runs/create ----------------------------------------------------------------

TRIAL_CREATE = re.compile(rb'"key":\s*"role",\s*"value":\s*"trial"')
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "content-length", "host"}


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """Forwards each request to the MLflow server; the first trial runs/create gets no reply (committed)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=300)
        upstream.request(self.command, self.path, body=body,
                         headers={k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP})
        response = upstream.getresponse()
        data = response.read()
        upstream.close()
        with self.server.lock:
            drop = (self.path.endswith("/runs/create") and body is not None and TRIAL_CREATE.search(body)
                    and not self.server.dropped)
            if drop:
                self.server.dropped.append(json.loads(data)["run"]["info"]["run_id"])
        if drop:  # the server committed the run; the client never hears of it
            self.close_connection = True
            return
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = forward


@pytest.fixture
def lossy_proxy(mlflow_server):
    """The URI of a proxy on 127.0.0.1 to the session's MLflow server that loses one reply; its server."""
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ProxyHandler)
    proxy.upstream_port = int(mlflow_server.rsplit(":", 1)[1])
    proxy.lock, proxy.dropped = threading.Lock(), []
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}", proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


@pytest.mark.slow
def test_a_lost_runs_create_reply_leaves_one_run_per_trial_and_analysis_names_an_empty_one(
        studies, lossy_proxy, mlflow_server, tmp_path):
    uri, proxy = lossy_proxy
    study = Study(tmp_path, "name: lost-reply\n" + TINY_BASE % 20 + "axes:\n  variant: [sn, bsn]\nseeds: 1\n",
                  uri)
    studies.append(study)
    study.start()
    assert study.wait(timeout=420) == 0, study.output()

    client = MlflowClient(mlflow_server)
    [committed] = proxy.dropped  # the fault happened: a run the client never heard of
    runs = trial_runs(client, "lost-reply")
    assert sorted(run.data.tags["cell"] for run in runs) == ["variant=bsn", "variant=sn"]  # once each
    for run in runs:
        assert_every_step_once(client, run, 20)
    experiment = client.get_experiment_by_name("lost-reply").experiment_id
    deleted = client.search_runs([experiment], "tags.role = 'trial'", ViewType.DELETED_ONLY)
    twin_keys = {run.data.tags["run_key"] for run in deleted}
    assert len(deleted) == 1 and twin_keys <= {run.data.tags["run_key"] for run in runs}
    assert committed in {run.info.run_id for run in runs + deleted}
    assert "report: " in study.output()

    # An empty trial run under the parent (a create no one followed up): skipped and named, no crash.
    [parent] = parent_runs(client, "lost-reply")
    ghost = client.create_run(experiment, tags={"role": "trial", "mlflow.parentRunId": parent.info.run_id,
                                                "cell": "variant=sn", "seed": "0"}).info.run_id
    said: list[str] = []
    tables = collect(mlflow_server, study="lost-reply", progress=said.append)
    assert len(tables.trials) == 2 and tables.meta["skipped_runs"] == ghost
    assert any(ghost in line and "skipped 1 empty trial run" in line for line in said)


# ---- a tracking outage longer than the client's retries ---------------------------------------------------

@pytest.mark.slow
def test_a_tracking_outage_longer_than_the_clients_retries_is_waited_out_and_ray_retries_nothing(
        studies, tmp_path):
    root, port = tmp_path / "mlflow", free_port()
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(root, port)
    # The client's own retry window: about a second, far shorter than the outage.
    quick_client = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    try:
        wait_for_http(f"{uri}/health")
        study = Study(tmp_path, "name: long-outage\n" + TINY_BASE % 120 + "axes:\n  variant: [sn, bsn]\n"
                      "seeds: 1\nmax_concurrent: 1\ntracking: {outage_wait_s: 300}\n", uri, quick_client)
        studies.append(study)
        client = MlflowClient(uri)
        study.start()
        wait_for(lambda: any(run.data.metrics.get("iteration", 0) >= 15
                             for run in trial_runs(client, "long-outage")), 300, "no trial reached 15")
        kill_mlflow_server(server)
        wait_for(lambda: "unreachable: waiting up to" in study.output(), 120, "no trial waited for /health")
        server = start_mlflow_server(root, port)  # same database, after the client's retries are long spent
        wait_for_http(f"{uri}/health")
        assert study.wait(timeout=420) == 0, study.output()

        runs = trial_runs(client, "long-outage")
        assert sorted(run.data.tags["cell"] for run in runs) == ["variant=bsn", "variant=sn"]
        for run in runs:
            assert_every_step_once(client, run, 120)
        [parent] = parent_runs(client, "long-outage")
        assert (parent.data.tags["status"], parent.info.status) == ("finished", "FINISHED")
        folders = ray_trial_folders(tmp_path / "ray")
        assert len(folders) == 2
        for folder in folders:  # one attempt each: Ray recorded no error and restored nothing
            assert not list(folder.glob("error.*")) and not (folder / "work" / "resume").exists()
    finally:
        kill_mlflow_server(server)


# ---- Ctrl+C, then the server moved ------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_kills_every_run_and_resume_after_the_server_moved_finishes_there(studies, tmp_path):
    root, old_port = tmp_path / "mlflow", free_port()
    root.mkdir()
    server = start_mlflow_server(root, old_port)
    try:
        old_uri = f"http://127.0.0.1:{old_port}"
        wait_for_http(f"{old_uri}/health")
        study = Study(tmp_path, "name: moved\n" + TINY_BASE % 100 + "axes:\n  variant: [sn, bsn]\nseeds: 1\n"
                      "max_concurrent: 1\n", old_uri)
        studies.append(study)
        client = MlflowClient(old_uri)
        study.start()

        def one_ended_one_past_its_checkpoint():
            study.watch()
            runs = trial_runs(client, "moved")
            ended = [run for run in runs if run.data.tags["status"] in ("finished", "diverged")]
            running = [run for run in runs if run.data.tags["status"] == "running"
                       and run.data.metrics.get("iteration", 0) >= 15]
            return (ended, running) if ended and running else None

        [ended], [cut] = wait_for(one_ended_one_past_its_checkpoint, 300, "no trial ended while one ran")
        os.kill(study.process.pid, signal.SIGINT)  # Ctrl+C
        assert study.wait(timeout=300) == 1, study.output()
        assert "interrupted" in study.output()
        [parent] = parent_runs(client, "moved")
        assert (parent.data.tags["status"], parent.info.status) == ("killed", "KILLED")
        cut_run = client.get_run(cut.info.run_id)
        assert (cut_run.data.tags["status"], cut_run.info.status) == ("killed", "KILLED")
        assert client.get_run(ended.info.run_id).info.status == "FINISHED"

        kill_mlflow_server(server)  # the server moves: its database and artifacts, a new port
        new_port = free_port()
        server = start_mlflow_server(root, new_port)
        new_uri = f"http://127.0.0.1:{new_port}"
        wait_for_http(f"{new_uri}/health")
        study.tracking_uri = new_uri
        study.start("--resume")
        assert study.wait(timeout=420) == 0, study.output()

        client = MlflowClient(new_uri)
        runs = trial_runs(client, "moved")
        assert sorted(run.info.run_id for run in runs) == sorted([ended.info.run_id, cut.info.run_id])
        for run in runs:
            assert_every_step_once(client, run, 100)
        [parent] = parent_runs(client, "moved")
        assert (parent.data.tags["status"], parent.info.status) == ("finished", "FINISHED")
    finally:
        kill_mlflow_server(server)


# ---- two first starts at once ------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_first_starts_of_one_study_on_a_new_sqlite_database_finish_apart_and_leave_it_whole(tmp_path):
    spec = tmp_path / "twin.yaml"
    spec.write_text("name: twin\n" + TINY_BASE % 10 + "seeds: 1\n")
    env = {key: value for key, value in os.environ.items()
           if key not in ("MLFLOW_TRACKING_URI", "GAN_STABILITY_STORAGE")}
    env |= {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local"}
    command = [sys.executable, str(REPOSITORY / "study" / "run.py"), "--study", str(spec)]  # the defaults
    logs = [tmp_path / f"driver-{k}.log" for k in range(2)]
    drivers = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True) for log in logs]
    started: set[int] = set()
    try:
        def both_ended() -> bool:
            for driver in drivers:
                started.update(descendants(driver.pid))
            return all(driver.poll() is not None for driver in drivers)

        wait_for(both_ended, 600, "the twin drivers did not end", every=1)
        outputs = "\n".join(log.read_text()[-3000:] for log in logs)
        assert [driver.returncode for driver in drivers] == [0, 0], outputs
    finally:
        for driver in drivers:
            if driver.poll() is None:
                driver.kill()
                driver.wait(timeout=30)
        kill_all(sorted(started))

    database = tmp_path / "mlflow.db"
    with sqlite3.connect(database) as connection:  # no half-done migration left behind
        tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert not [name for name in tables if name.startswith("_alembic_tmp")]
    client = MlflowClient(f"sqlite:///{database}")
    parents = parent_runs(client, "twin")
    assert len(parents) == 2 and {parent.info.status for parent in parents} == {"FINISHED"}
    trials = trial_runs(client, "twin")
    assert sorted(run.data.tags["mlflow.parentRunId"] for run in trials) == sorted(
        parent.info.run_id for parent in parents)  # a trial run under each parent
    folders = {parent.data.tags["ray_experiment"] for parent in parents}
    assert len(folders) == 2 and all(Path(folder).parent == tmp_path / "runs" for folder in folders)


# ---- a deterministic error --------------------------------------------------------------------------------

def digits_imagefolder(root: Path, count: int = 40) -> Path:
    """`count` real digits as 32 px RGB PNGs in root/digits/, and a file named .png that is no image."""
    folder = root / "digits"
    folder.mkdir(parents=True)
    for index, digit in enumerate(load_digits().images[:count]):
        image = Image.fromarray((digit * 255 / 16).astype(np.uint8)).resize((32, 32)).convert("RGB")
        image.save(folder / f"{index:03d}.png")
    # Not empty, sorted last: a pre-flight that reads the first image and checks every file's size passes it.
    (folder / "zz_broken.png").write_bytes(b"this is no PNG image\n" * 8)
    return root


@pytest.mark.slow
def test_an_undecodable_image_fails_its_trial_once_with_the_message_on_its_failed_run(studies, mlflow_server,
                                                                                      tmp_path):
    data = digits_imagefolder(tmp_path / "images")
    base = (f"base: {{dataset: imagefolder, data_root: {data}, metrics: [fd_digits], cache_dir: "
            f"{tmp_path / 'cache'}, device: cpu, width: 0.125, z_dim: 16, batch_size: 8, iterations: 30, "
            "log_every: 5, eval_every: 10, checkpoint_every: 10, eval_generated: 64, eval_real: 32}\n")
    study = Study(tmp_path, "name: bad-image\n" + base + "seeds: 1\nmax_failures: 2\n", mlflow_server)
    studies.append(study)
    study.start()
    assert study.wait(timeout=420) == 1, study.output()

    client = MlflowClient(mlflow_server)
    [run] = trial_runs(client, "bad-image")
    tags = run.data.tags
    assert (run.info.status, tags["status"], tags["failure"]) == ("FAILED", "failed", "deterministic")
    assert "ImageDecodeError" in tags["error"] and "cannot decode" in tags["error"]
    assert "zz_broken.png" in tags["error"]
    artifact = client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path / "artifact"))
    text = Path(artifact).read_text()
    assert text.startswith("Traceback") and "zz_broken.png" in text
    [folder] = ray_trial_folders(tmp_path / "ray")
    assert not list(folder.glob("error.*"))  # Ray saw no error: the one attempt, not retried
    assert "FAILED, not retried" in study.output()
    assert "1 trials ended: 0 stable, 0 diverged, 0 collapsed, 0 no_learning, 1 failed" in study.output()
    [parent] = parent_runs(client, "bad-image")
    assert (parent.data.tags["status"], parent.info.status) == ("failed", "FAILED")
