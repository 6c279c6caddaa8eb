"""A two-node Ray simulated on this machine: fractional-GPU trials are placed as the spec asks, without a GPU.

`ray start --head` (1 CPU, no GPU) plus `ray start --address` (4 CPUs and a declared GPU count of 1): a study
asking 0.25 GPU per trial must put all four trials on the GPU node, on GPU 0, a quarter of it each.
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
from pathlib import Path

import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient

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


@pytest.fixture
def two_node_ray(tmp_path):
    """Address of a head (1 CPU, 0 GPU) and a worker (4 CPUs, 1 GPU declared), and the alive nodes."""
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    common = ["--block", "--disable-usage-stats"]
    head = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
                             "--include-dashboard=false", f"--temp-dir={temp_dir}", *common], env=env,
                            stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    worker = None
    try:
        address = f"127.0.0.1:{port}"
        env["RAY_ADDRESS"] = address
        deadline = time.monotonic() + 120
        status = [RAY, "status", f"--address={address}"]
        while subprocess.run(status, env=env, capture_output=True).returncode:
            assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(1)
        worker = subprocess.Popen([RAY, "start", f"--address={address}", "--num-cpus=4", "--num-gpus=1",
                                   *common], env=env, stdout=open(tmp_path / "worker.log", "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        nodes: list = []
        while len(nodes) < 2:
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(1)
            out = subprocess.run([sys.executable, "-c", NODES], env=env, capture_output=True, text=True)
            nodes = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []
        yield env, nodes
    finally:
        if worker is not None:
            stop(worker)
        stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


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
