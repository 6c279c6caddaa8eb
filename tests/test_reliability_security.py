"""Security: MLflow on the cluster's private network only; YAML read with safe loading; no pickle from a
user's file runs code (checkpoints: weights_only=True; CIFAR-10: a restricted unpickler); no credentials in
files.

Each malicious input carries a live payload (it touches a sentinel file): the tests first show that an unsafe
reader does run it, then that ours refuses it and the sentinel never appears.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from study.spec import StudyError, load_spec
from trainables.data import load_images
from trainables.train import train
from trainables.trial import CHECKPOINT_FILE, CheckpointError

REPOSITORY = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve()


def repository_files(suffixes: tuple[str, ...] = ()) -> list[Path]:
    """Files git tracks or would track (new, not ignored): what a commit would publish."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPOSITORY,
                            capture_output=True, text=True, check=True).stdout.split()
    paths = [REPOSITORY / name for name in listed if (REPOSITORY / name).is_file()]
    return [path for path in paths if not suffixes or path.suffix in suffixes]


# ---- MLflow reachable from the cluster only ------------------------------------------------------

def test_cluster_mlflow_binds_the_private_ip_and_no_public_port_is_opened():
    config = yaml.safe_load((REPOSITORY / "cluster.yaml").read_text())
    [server] = [line for line in config["head_start_ray_commands"] if " mlflow server " in line]
    # `hostname -I` lists the addresses of the node's own interfaces: on EC2 the private one (public IPs are
    # NAT'ed by AWS and never on an interface).
    assert server.count("--host ") == 1 and "--host $(hostname -I | awk '{print $1}')" in server
    assert not re.search(r"0\.0\.0\.0|::|--host\s+\*", server)
    starts = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts  # Ray's dashboard: the head itself only
    # No security group of our own, so Ray's default applies: SSH (22) from outside, everything else inside.
    for node in config["available_node_types"].values():
        assert not {"SecurityGroupIds", "NetworkInterfaces"} & set(node["node_config"])
    assert "security_group" not in config["provider"]


# ---- YAML: safe loading only ---------------------------------------------------------------------

UNSAFE_YAML = re.compile(r"yaml\.(unsafe_load|full_load|load_all)\("
                         r"|yaml\.load\((?![^)]*Loader=UniqueKeyLoader)"
                         r"|Loader=yaml\.(Loader|FullLoader|UnsafeLoader)")


def offending_lines(pattern: re.Pattern, skip_tests: bool = False) -> list[str]:
    """path:line of every Python source line whose code (comments left out) matches pattern."""
    return [f"{path.relative_to(REPOSITORY)}:{number}" for path in repository_files((".py",))
            if path != THIS_FILE and not (skip_tests and "tests" in path.relative_to(REPOSITORY).parts)
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if pattern.search(line.split("#", 1)[0])]


def test_no_source_file_reads_yaml_with_an_unsafe_loader():
    assert offending_lines(UNSAFE_YAML) == []


def test_spec_with_a_python_object_tag_is_refused_and_runs_nothing(tmp_path):
    sentinel = tmp_path / "pwned"
    payload = f"name: evil\nbase: !!python/object/apply:os.system ['touch {sentinel}']\n"
    yaml.unsafe_load(payload)  # the payload is live: an unsafe loader runs it
    assert sentinel.exists()
    sentinel.unlink()
    spec = tmp_path / "evil.yaml"
    spec.write_text(payload)
    with pytest.raises(StudyError, match="could not determine a constructor for the tag"):
        load_spec(str(spec))
    assert not sentinel.exists()


# ---- pickle: never from a user's file ------------------------------------------------------------

UNSAFE_PICKLE = re.compile(r"pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)|allow_pickle=True"
                           r"|weights_only=False")


def test_no_source_file_unpickles_without_restriction():
    assert offending_lines(UNSAFE_PICKLE, skip_tests=True) == []  # tests load what they wrote themselves


class Payload:
    """Unpickled, it runs `touch SENTINEL` (in the process that unpickles it)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def test_checkpoint_that_would_run_code_is_refused_on_resume(tmp_path):
    sentinel = tmp_path / "pwned"
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save({"iteration": Payload(sentinel), "generator": {}}, folder / CHECKPOINT_FILE)
    unsafe = f"import torch; torch.load({str(folder / CHECKPOINT_FILE)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", unsafe], check=True, timeout=120)
    assert sentinel.exists()  # live: an unrestricted torch.load runs it
    sentinel.unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint {folder / CHECKPOINT_FILE} cannot be loaded"):
        train({"iterations": 10, "device": "cpu"}, lambda metrics, checkpoint_dir=None: None,
              workdir=tmp_path / "work", resume_from=folder)
    assert not sentinel.exists()


def test_cifar10_batch_that_would_run_code_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    clean = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for index in range(1, 6):
        (folder / f"data_batch_{index}").write_bytes(pickle.dumps(clean, protocol=2))
    evil = pickle.dumps({b"data": Payload(sentinel), b"labels": [0]}, protocol=2)
    (folder / "data_batch_3").write_bytes(evil)
    pickle.loads(evil)  # live: plain pickle (as torchvision's CIFAR10 reads it) runs it
    assert sentinel.exists()
    sentinel.unlink()
    with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.system"):
        load_images("cifar10", tmp_path, 32)
    assert not sentinel.exists()


# ---- credentials: from the environment only ------------------------------------------------------

SECRETS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"aws_secret_access_key\s*[=:]\s*\S+", re.IGNORECASE),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "password in a URI": re.compile(r"[a-z+]+://[^/\s:@'\"]+:(?!\*+@)[^/\s@'\"{}$]+@"),  # *** : redacted
    "assigned password or token": re.compile(
        r"\b(password|passwd|api_key|apikey|secret|token)\s*[=:]\s*['\"][^'\"\s]{8,}['\"]", re.IGNORECASE),
}


def test_no_file_of_the_repository_holds_a_credential():
    found = []
    for path in repository_files():
        if path == THIS_FILE or path.suffix in (".png", ".pt", ".npz", ".parquet"):
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        found += [f"{path.relative_to(REPOSITORY)}: {name}" for name, pattern in SECRETS.items()
                  if pattern.search(text)]
    assert found == []


@pytest.mark.parametrize(("kind", "line"), [
    ("AWS access key id", "key = 'AKIAIOSFODNN7EXAMPLE'"),
    ("private key", "-----BEGIN OPENSSH PRIVATE KEY-----"),
    ("password in a URI", "uri: postgresql://mlflow:hunter22@db:5432/mlflow"),
    ("assigned password or token", 'token = "0123456789abcdef"'),
])
def test_the_secret_patterns_catch_what_they_are_for(kind, line):
    assert SECRETS[kind].search(line)


def test_a_redacted_password_in_a_uri_is_no_credential():
    assert not SECRETS["password in a URI"].search("tracking postgresql://mlflow:***@db:5432/mlflow")
