"""Ray clusters started on this machine with `ray start`:
- one that nobody names is not joined: a driver without $RAY_ADDRESS or --ray-address starts a Ray of its own,
  where `ray.init(address="auto")` would have joined it.
A two-node Ray simulated on this machine (`ray start --head` plus `ray start --address`), which the driver
joins because $RAY_ADDRESS names it:
- fractional-GPU trials are placed as the spec asks, without a GPU: a head of 1 CPU and no GPU, a worker of 4
  CPUs and a declared GPU count of 1; 0.25 GPU per trial puts all four trials on GPU 0 of the GPU node;
- a worker node lost mid-trial (its raylet and workers SIGKILLed): the trial is retried on the head from its
  checkpoint, every trial once in MLflow, no metric step missing or logged twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient
from test_reliability_faults import (
    TINY_BASE,
    Study,
    assert_every_step_once,
    descendants,
    kill_all,
    resumed_at,
    trial_runs,
    wait_for,
)

REPOSITORY = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
NODES = "import json, ray; ray.init(); print(json.dumps([n for n in ray.nodes() if n['Alive']]))"


def stop(process: subprocess.Popen) -> None:
    """End a `ray start --block` and the Ray processes of its own session, by process group."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@contextmanager
def ray_cluster(tmp_path: Path, head: list[str], worker: list[str] | None,
                head_env: dict[str, str] | None = None):
    """`ray start` a head and a worker, unless None (each `--block`, its own session): (env with RAY_ADDRESS,
    the alive nodes, the worker's `ray start` process); stopped at the end."""
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    common = ["--block", "--disable-usage-stats"]
    head_process = subprocess.Popen([RAY, "start", "--head", f"--port={port}", *head,
                                     "--include-dashboard=false", f"--temp-dir={temp_dir}", *common],
                                    env={**env, **(head_env or {})}, stdout=open(tmp_path / "head.log", "w"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
    worker_process = None
    try:
        address = f"127.0.0.1:{port}"
        env["RAY_ADDRESS"] = address
        deadline = time.monotonic() + 120
        status = [RAY, "status", f"--address={address}"]
        while subprocess.run(status, env=env, capture_output=True).returncode:
            assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(1)
        if worker is not None:
            worker_process = subprocess.Popen([RAY, "start", f"--address={address}", *worker, *common],
                                              env=env, stdout=open(tmp_path / "worker.log", "w"),
                                              stderr=subprocess.STDOUT, start_new_session=True)
        nodes: list = []
        while len(nodes) < (1 if worker is None else 2):
            assert time.monotonic() < deadline, "the nodes did not come up"
            time.sleep(1)
            out = subprocess.run([sys.executable, "-c", NODES], env=env, capture_output=True, text=True)
            nodes = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []
        yield env, nodes, worker_process
    finally:
        if worker_process is not None:
            stop(worker_process)
        stop(head_process)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def two_node_ray(tmp_path):
    """Address of a head (1 CPU, 0 GPU) and a worker (4 CPUs, 1 GPU declared), and the alive nodes."""
    with ray_cluster(tmp_path, ["--num-cpus=1", "--num-gpus=0"], ["--num-cpus=4", "--num-gpus=1"]) as started:
        yield started[:2]


@pytest.mark.slow
def test_quarter_gpu_trials_share_gpu_0_of_the_gpu_node(two_node_ray, mlflow_server, tmp_path):
    env, nodes = two_node_ray
    [gpu_node] = [node["NodeID"] for node in nodes if node["Resources"].get("GPU") == 1]
    spec = tmp_path / "gpu.yaml"
    spec.write_text("name: gpu-placement\nbase: {dataset: digits, device: cpu, width: 0.125, batch_size: 16, "
                    "iterations: 30, log_every: 10, eval_every: 30, checkpoint_every: 30, "
                    "eval_generated: 100, eval_real: 100}\naxes:\n  variant: [none, sn]\nseeds: 2\n"
                    "resources: {cpus: 1, gpu: 0.25}\n")
    run = subprocess.run([sys.executable, str(REPOSITORY / "study" / "run.py"), "--study", str(spec),
                          "--tracking-uri", mlflow_server, "--storage", str(tmp_path / "ray")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=480)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("gpu-placement")
    trials = client.search_runs([experiment.experiment_id], "tags.role = 'trial'")
    assert len(trials) == 4
    assert {run.data.tags["node_id"] for run in trials} == {gpu_node}  # never on the GPU-less head
    assert {run.data.tags["gpu_ids"] for run in trials} == {"0"}  # four quarter-GPU trials share GPU 0
    # Each holds a quarter of it (and one of the node's four CPUs): Ray could place all four at once.
    assert [json.loads(run.data.tags["resources"]) for run in trials] == [{"CPU": 1.0, "GPU": 0.25}] * 4


# The GCS declares a node dead after 3 missed health checks a second apart (Ray's default: 5 of 3 s).
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                   "RAY_health_check_failure_threshold": "3"}


@pytest.mark.slow
def test_a_worker_node_lost_mid_trial_is_retried_on_the_head_with_every_trial_and_step_once(
        studies, mlflow_server, tmp_path):
    with ray_cluster(tmp_path, ["--num-cpus=1"], ["--num-cpus=1"], FAST_NODE_DEATH) as (env, nodes, worker):
        [worker_node] = [node["NodeID"] for node in nodes
                         if "node:__internal_head__" not in node["Resources"]]
        spec = "name: node-loss\n" + TINY_BASE % 100 + "axes:\n  variant: [sn, bsn]\nseeds: 1\n"
        study = Study(tmp_path, spec, mlflow_server, {"RAY_ADDRESS": env["RAY_ADDRESS"]})
        studies.append(study)
        client = MlflowClient(mlflow_server)
        study.start()

        def trial_on_the_worker_past_a_checkpoint():  # iteration 15 logged, the checkpoint of 10 behind it
            runs = [run for run in trial_runs(client, "node-loss") if run.data.tags["node_id"] == worker_node
                    and run.data.metrics.get("iteration", 0) >= 15]
            return runs[0] if runs else None

        victim = wait_for(trial_on_the_worker_past_a_checkpoint, 300, "no trial on the worker reached 15")
        kill_all([worker.pid, *descendants(worker.pid)])  # the machine is gone: raylet, agents, trial worker
        worker.wait(timeout=30)
        assert study.wait(timeout=420) == 0, study.output()

        runs = trial_runs(client, "node-loss")
        assert sorted(run.data.tags["cell"] for run in runs) == ["variant=bsn", "variant=sn"]  # each once
        for run in runs:
            assert_every_step_once(client, run, 100)
        # The lost trial went on in its own run from a checkpoint (10 or later), on the head.
        [iteration] = resumed_at(client, victim)
        assert iteration in range(10, 100, 10)


@pytest.mark.slow
def test_a_ray_running_on_the_machine_is_not_joined_unless_named(studies, mlflow_server, tmp_path):
    with ray_cluster(tmp_path, ["--num-cpus=1"], None) as (env, nodes, _):
        [foreign] = [node["NodeID"] for node in nodes]
        unnamed = {key: value for key, value in env.items() if key != "RAY_ADDRESS"}
        joined = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='auto'); "
                                 "print(ray.get_runtime_context().get_node_id())"], env=unnamed,
                                capture_output=True, text=True, timeout=120)
        assert joined.stdout.split()[-1] == foreign  # live: what the driver did before joined it
        study = Study(tmp_path, "name: own-ray\n" + TINY_BASE % 10 + "seeds: 1\n", mlflow_server)
        study.env.pop("RAY_ADDRESS")
        studies.append(study)
        study.start()
        assert study.wait(timeout=420) == 0, study.output()
        [run] = trial_runs(MlflowClient(mlflow_server), "own-ray")
        assert run.data.tags["node_id"] != foreign
