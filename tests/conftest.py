"""Shared fixtures: real servers on 127.0.0.1, started once per test session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port with a sqlite backend and artifacts under root."""
    log = open(root / "server.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def kill_mlflow_server(server: subprocess.Popen) -> None:
    """SIGKILL a server started in a session of its own (`start_mlflow_server`) and its workers, its process
    group, if it still runs, then reap it: an outage the tests inject, and their cleanup."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


def wait_for_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.3)


@contextmanager
def float64_trials():
    """Trials built in this block train in float64 (BatchSampler's batches become float64; the digits
    classifier stays float32), single and packed alike. Float32 rounding differs between CPUs and kernels,
    and a GAN's Adam steps amplify it; in float64 equal computations agree to ~1e-14."""
    import torch

    from trainables.data import BatchSampler
    from trainables.metrics.fd_digits import DigitsFeatureExtractor

    float32_init = DigitsFeatureExtractor.__init__

    def digits_extractor_in_float32(self, *args, **kwargs):
        torch.set_default_dtype(torch.float32)
        try:
            float32_init(self, *args, **kwargs)
        finally:
            torch.set_default_dtype(torch.float64)

    sampler_next = BatchSampler.next
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BatchSampler, "next", lambda self: sampler_next(self).double())
        patch.setattr(DigitsFeatureExtractor, "__init__", digits_extractor_in_float32)
        torch.set_default_dtype(torch.float64)
        try:
            yield
        finally:
            torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """The tracking URI of a real MLflow server process, shared by the session's tracking tests."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = start_mlflow_server(root, port)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health")
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray (2 CPUs, no dashboard) shared by one module's tests that run studies in this process;
    down at the module's end, so that no other module finds a Ray it did not start."""
    import ray

    # address="local": a Ray of the tests' own, never one `ray start` runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def studies() -> list:
    """The studies a test starts (test_reliability_faults.py: Study), each stopped with its Ray at the end."""
    started: list = []
    yield started
    for study in started:
        study.stop()
