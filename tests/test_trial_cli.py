"""`python -m trainables`: one trial without Ray, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

TINY = ["--set", "width=0.125", "--set", "batch_size=8", "--set", "iterations=20", "--set", "log_every=5",
        "--set", "eval_every=10", "--set", "checkpoint_every=10", "--set", "eval_generated=64",
        "--set", "eval_real=64"]


def trainables(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainables", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_trains_prints_progress_and_writes_metrics_samples_and_checkpoint(tmp_path):
    out = tmp_path / "trial"
    result = trainables(*TINY, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stdout.splitlines() if line.startswith("iter")]
    assert [line.split()[1] for line in progress] == ["5", "10", "15", "20"]
    assert "it/s" in progress[0] and "loss_d" in progress[0] and "fd_digits" in progress[1]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [5, 10, 15, 20]
    assert rows[-1]["done"] == 1 and rows[-1]["objective"] == rows[-1]["fd_digits"]
    assert json.loads(result.stdout.splitlines()[-1]) == {  # 20 iterations: never better than one image yet
        "outcome": "no_learning", "objective": rows[-1]["objective"], "diverged": 0, "divergence_cause": "",
        "divergence_step": -1}
    grid = Image.open(out / "samples" / "iter_0000020.png")
    assert grid.size[0] > 32 * 7 and len(set(grid.convert("L").getdata())) > 10  # an 8-wide grid, not blank
    assert (out / "checkpoint" / "state.pt").is_file()


def test_resume_continues_from_the_checkpoint_and_appends_metrics(tmp_path):
    out = tmp_path / "trial"
    assert trainables(*TINY, "--set", "iterations=10", "--out", str(out), cwd=tmp_path).returncode == 0
    result = trainables(*TINY, "--set", "iterations=10", "--out", str(out), "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the finished trial only reports its result again
    assert [row["iteration"] for row in rows] == [5, 10, 10]
    assert rows[-1] == rows[1]


def test_config_file_and_overrides_are_validated_before_training(tmp_path):
    config = tmp_path / "trial.yaml"
    config.write_text("variant: bssn\nscale: 1.5\nn_dis: 0\n")
    result = trainables("--config", str(config), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert "n_dis: n_dis must be >= 1, got 0" in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_variant_names_the_valid_ones(tmp_path):
    result = trainables("--set", "variant=spectral", cwd=tmp_path)
    assert result.returncode == 2
    assert "variant:" in result.stderr and "'bssn'" in result.stderr and "'strict_sn'" in result.stderr


def test_missing_dataset_names_the_expected_path(tmp_path):
    result = trainables("--set", "dataset=cifar10", "--set", f"data_root={tmp_path / 'data'}",
                        "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert str(tmp_path / "data" / "cifar-10-batches-py") in result.stderr
    assert "download" in result.stderr
    assert not (tmp_path / "out").exists()


def test_fid_without_inception_weights_says_how_to_provide_them(tmp_path):
    result = trainables(*TINY, "--set", "metrics=[fid]", "--set", f"inception_weights={tmp_path / 'no.pth'}",
                        "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert "inception_weights" in result.stderr and str(tmp_path / "no.pth") in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
