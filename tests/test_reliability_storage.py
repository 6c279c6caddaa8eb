"""Damaged checkpoints and bad storage: a corrupt or truncated checkpoint is refused naming the file; a full
disk at a checkpoint keeps the previous one whole and resumable; a full disk under Ray's storage, as Ray
copies a checkpoint there, is named with the folder; unwritable storage is refused at the edge with what was
already written left as it was.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from study.run import main as study_main
from trainables.__main__ import main as trial_main
from trainables.packing import member_name, train_pack
from trainables.train import train
from trainables.trial import CHECKPOINT_FILE, CheckpointError

TINY = {"width": 0.125, "batch_size": 8, "z_dim": 16, "iterations": 20, "log_every": 5, "eval_every": 1000,
        "checkpoint_every": 10, "eval_generated": 64, "eval_real": 64, "device": "cpu"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """state.pt of a tiny trial stopped at iteration 10, written by train itself."""
    folder = tmp_path_factory.mktemp("trial")
    train(TINY | {"iterations": 10}, lambda metrics, checkpoint_dir=None: None, workdir=folder)
    return folder / "checkpoint" / CHECKPOINT_FILE


def tensor_record_offset(path: Path) -> int:
    """Byte offset of the middle of the largest tensor record inside a torch.save zip."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as file:
        file.seek(info.header_offset + 26)
        name_length, extra_length = (int.from_bytes(file.read(2), "little") for _ in range(2))
    return info.header_offset + 30 + name_length + extra_length + info.file_size // 2


def damage(good: bytes, how: str, record: int) -> bytes:
    if how == "truncated":
        return good[: len(good) // 2]
    if how == "empty":
        return b""
    if how == "not_a_checkpoint":
        return b"this is a text file, not a checkpoint\n"
    flipped = bytearray(good)  # one flipped bit inside a weight: torch.load alone loads it without a word
    flipped[record] ^= 0x01
    return bytes(flipped)


@pytest.mark.parametrize(("how", "named"), [
    ("truncated", "cannot be loaded"), ("empty", "cannot be loaded"),
    ("not_a_checkpoint", "cannot be loaded"), ("bit_flip_in_a_weight", "fails its CRC check"),
])
def test_damaged_checkpoint_is_refused_naming_the_file_before_training(checkpoint, tmp_path, how, named):
    resume = tmp_path / "checkpoint"
    resume.mkdir()
    damaged = damage(checkpoint.read_bytes(), how, tensor_record_offset(checkpoint))
    (resume / CHECKPOINT_FILE).write_bytes(damaged)
    reports = []
    with pytest.raises(CheckpointError) as info:
        train(TINY, lambda metrics, checkpoint_dir=None: reports.append(metrics), workdir=tmp_path / "work",
              resume_from=resume)
    assert f"checkpoint {resume / CHECKPOINT_FILE}" in str(info.value) and named in str(info.value)
    assert reports == [] and not (tmp_path / "work").exists()


def test_the_bit_flip_is_silent_without_the_crc_check(checkpoint, tmp_path):
    """What the CRC check is for: torch.load returns the damaged weights as if nothing happened."""
    path = tmp_path / CHECKPOINT_FILE
    offset = tensor_record_offset(checkpoint)
    path.write_bytes(damage(checkpoint.read_bytes(), "bit_flip_in_a_weight", offset))
    damaged, good = (torch.load(p, weights_only=True) for p in (path, checkpoint))
    differing = [key for key in good["generator"] if not torch.equal(good["generator"][key],
                                                                     damaged["generator"][key])]
    differing += [key for key in good["discriminator"] if not torch.equal(good["discriminator"][key],
                                                                          damaged["discriminator"][key])]
    assert len(differing) == 1


def test_trial_command_line_resume_from_a_truncated_checkpoint_exits_2_naming_it(checkpoint, tmp_path,
                                                                                  capsys):
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / CHECKPOINT_FILE).write_bytes(checkpoint.read_bytes()[:1000])
    overrides = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    assert trial_main(["--out", str(out), "--resume", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {out / 'checkpoint' / CHECKPOINT_FILE} cannot be loaded")


# ---- a full disk -------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MiB tmpfs (needs root, as in CI; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(folder: Path) -> None:
    """Write until the filesystem says ENOSPC."""
    with open(folder / "filler", "wb") as file:
        try:
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        except OSError as exc:
            assert exc.errno == 28  # ENOSPC


def test_full_disk_at_a_checkpoint_is_named_and_the_previous_checkpoint_stays_whole(small_disk):
    workdir = small_disk / "trial"
    saved: dict[str, str] = {}

    def report(metrics, checkpoint_dir=None):
        if checkpoint_dir is not None and not saved:  # the disk fills up right after the first checkpoint
            kept = Path(checkpoint_dir) / CHECKPOINT_FILE
            saved["sha256"] = hashlib.sha256(kept.read_bytes()).hexdigest()
            fill(small_disk)

    config = TINY | {"iterations": 30}  # checkpoints at 10 and 20; the one evaluation (and its PNG) at 30
    with pytest.raises(CheckpointError) as info:
        train(config, report, workdir=workdir)
    path = workdir / "checkpoint" / CHECKPOINT_FILE
    assert f"cannot write checkpoint {path}" in str(info.value)
    assert "the previous checkpoint is kept" in str(info.value)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == saved["sha256"]
    assert sorted(p.name for p in path.parent.iterdir()) == [CHECKPOINT_FILE]  # no partial file left

    (small_disk / "filler").unlink()  # space again: the run resumes from the kept checkpoint and finishes
    reports = []
    summary = train(config, lambda metrics, checkpoint_dir=None: reports.append(metrics["iteration"]),
                    workdir=workdir, resume_from=workdir / "checkpoint")
    assert reports == [15, 20, 25, 30] and summary["done"] == 1


def test_full_disk_at_a_pack_checkpoint_gets_the_single_trials_error_and_keeps_every_member_checkpoint(
        small_disk):
    workdir = small_disk / "pack"
    folders = [workdir / "checkpoint" / member_name(k) for k in range(2)]
    saved: dict[Path, str] = {}

    def report(metrics, checkpoint_dir=None):
        if checkpoint_dir is not None and Path(checkpoint_dir) == folders[-1] and not saved:
            saved.update({folder: hashlib.sha256((folder / CHECKPOINT_FILE).read_bytes()).hexdigest()
                          for folder in folders})
            fill(small_disk)  # the disk fills up right after the pack's first checkpoint

    configs = [TINY | {"iterations": 30, "seed": seed} for seed in (0, 1)]
    with pytest.raises(CheckpointError) as info:
        train_pack(configs, [report, report], workdir=workdir)
    assert f"cannot write checkpoint {folders[0] / CHECKPOINT_FILE}" in str(info.value)
    assert "bytes free there; the previous checkpoint is kept" in str(info.value)
    for folder in folders:
        assert hashlib.sha256((folder / CHECKPOINT_FILE).read_bytes()).hexdigest() == saved[folder]
        assert sorted(p.name for p in folder.iterdir()) == [CHECKPOINT_FILE]  # no partial file left

    (small_disk / "filler").unlink()  # space again: the pack resumes from the kept checkpoints and finishes
    reports: list[list[int]] = [[], []]
    summaries = train_pack(configs, [lambda metrics, checkpoint_dir=None, k=k: reports[k].append(
        metrics["iteration"]) for k in range(2)], workdir=workdir, resume_from=workdir / "checkpoint")
    assert reports == [[15, 20, 25, 30]] * 2 and all(summary["done"] == 1 for summary in summaries)


def copy_into_full_storage(config: dict) -> None:
    """A Tune trial whose checkpoint (on a disk with room) goes into Ray's storage, a disk just filled."""
    from study.adapter import StudyContext, report_to_tune

    checkpoint = Path(config["scratch"]) / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / CHECKPOINT_FILE).write_bytes(os.urandom(1 << 20))
    fill(Path(config["storage"]))
    context = StudyContext(spec={}, tracking_uri="", experiment_id="", parent_run_id="", cwd="",
                           storage=config["storage"])
    try:
        report_to_tune({"iteration": 10, "objective": 1.0}, str(checkpoint), context)
    finally:
        (Path(config["storage"]) / "filler").unlink()  # room again for Ray's own record of the error


def test_full_disk_under_rays_storage_at_a_checkpoint_copy_names_the_folder_and_its_free_space(
        small_disk, ray_local, tmp_path):
    from ray import cloudpickle, tune

    tuner = tune.Tuner(copy_into_full_storage,
                       param_space={"scratch": str(tmp_path / "scratch"), "storage": str(small_disk)},
                       run_config=tune.RunConfig(name="full", storage_path=str(small_disk), verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=0)))
    this_module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(this_module)  # Ray's workers cannot import tests/ by name
    try:
        [result] = tuner.fit()
    finally:
        cloudpickle.unregister_pickle_by_value(this_module)
    message = str(result.error)
    source, trial = tmp_path / "scratch" / "checkpoint", small_disk / "full" / "copy_into_full_storage_"
    assert f"cannot copy checkpoint {source} into Ray's storage {trial}" in message
    assert "(no space left on device); " in message
    assert "bytes free there; Ray keeps the previous checkpoint" in message


# ---- unwritable storage ------------------------------------------------------------------------------------

@pytest.fixture
def read_only_results(small_disk):
    """Results of an earlier study on a disk remounted read-only: (folder, their sha256 by path)."""
    earlier = small_disk / "runs" / "earlier-study"
    earlier.mkdir(parents=True)
    (earlier / "experiment_state.json").write_text('{"trials": 2}')
    (earlier / "state.pt").write_bytes(os.urandom(4096))
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    return small_disk / "runs", {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in earlier.iterdir()}


@pytest.mark.parametrize("flag", ["--storage", "--tracking-uri"])
def test_read_only_storage_or_tracking_folder_is_refused_and_what_is_there_is_untouched(
        read_only_results, tmp_path, monkeypatch, capsys, flag):
    runs, hashes = read_only_results
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    target = str(runs) if flag == "--storage" else f"sqlite:///{runs}/mlflow.db"
    assert study_main(["--study", "default", flag, target]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} {target}: cannot write in {runs} (Read-only file system)" in err
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in hashes} == hashes
    assert sorted(runs.iterdir()) == [runs / "earlier-study"]
