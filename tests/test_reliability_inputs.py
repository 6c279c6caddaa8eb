"""The bad-input corpus (tests/bad_inputs/): each malformed spec and command line of `study/run.py` is refused
with exit code 2 and a message naming the problem, before Ray starts, writing nothing, creating no MLflow run.

specs/*.yaml: one malformed study spec per file, its first line `# refused: <fragment of the message>`.
command_lines.yaml: argument lists with the fragment each must be refused with.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from conftest import free_port
from mlflow.tracking import MlflowClient

import study.run
from study.run import main

REPOSITORY = Path(__file__).resolve().parent.parent
BAD_INPUTS = Path(__file__).resolve().parent / "bad_inputs"
SPEC_FILES = sorted((BAD_INPUTS / "specs").glob("*.yaml"))
COMMAND_LINES = yaml.safe_load((BAD_INPUTS / "command_lines.yaml").read_text())
VALID_SPEC = ("name: tiny\nbase: {dataset: digits, device: cpu, iterations: 20, eval_every: 10, "
              "checkpoint_every: 10}\naxes: {variant: [sn, bsn]}\n")


def refused_fragment(spec_file: Path) -> str:
    first = spec_file.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# refused: "), f"{spec_file.name}: first line must be '# refused: ...'"
    return first.removeprefix("# refused: ")


def fill(argv: list[str], folder: Path) -> list[str]:
    """The table's placeholders: a closed port, an existing plain file, a valid spec (both in folder)."""
    (folder / "a-file").write_text("")
    (folder / "tiny.yaml").write_text(VALID_SPEC)
    values = {"closed_port": free_port(), "file": folder / "a-file", "spec": folder / "tiny.yaml"}
    return [arg.format(**values) for arg in argv]


def exit_code(argv: list[str]) -> int:
    """main's return value, or argparse's exit code."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.fixture
def edge(tmp_path, monkeypatch):
    """A clean working folder, no tracking or storage from the environment, the study starting its own Ray
    here (whatever else runs on this machine: the pre-flight checks this one), and Ray's start forbidden."""
    monkeypatch.chdir(tmp_path)
    for variable in ("MLFLOW_TRACKING_URI", "GAN_STABILITY_STORAGE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "local")

    def ray_must_not_start(*args, **kwargs):
        raise AssertionError("bad input reached Ray")

    monkeypatch.setattr(ray, "init", ray_must_not_start)
    monkeypatch.setattr(study.run, "run_study", ray_must_not_start)
    return tmp_path


def test_corpus_holds_at_least_30_specs_and_20_command_lines():
    assert len(SPEC_FILES) >= 30 and len(COMMAND_LINES) >= 20
    assert all(set(case) == {"argv", "refused"} for case in COMMAND_LINES)


@pytest.mark.parametrize("spec_file", SPEC_FILES, ids=[path.stem for path in SPEC_FILES])
def test_malformed_spec_exits_2_naming_the_problem_before_ray_writing_nothing(edge, capsys, spec_file):
    assert exit_code(["--study", str(spec_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and refused_fragment(spec_file) in err, err
    assert "Traceback" not in err
    assert list(edge.iterdir()) == []  # no mlflow.db, no runs/


@pytest.mark.parametrize("case", COMMAND_LINES, ids=[" ".join(case["argv"]) for case in COMMAND_LINES])
def test_malformed_command_line_exits_2_naming_the_problem_before_ray_writing_nothing(edge, capsys, case):
    argv = fill(case["argv"], edge)
    before = sorted(edge.iterdir())
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert case["refused"] in err, err
    assert "Traceback" not in err
    assert sorted(edge.iterdir()) == before


def all_runs(client: MlflowClient) -> set[str]:
    experiments = [e.experiment_id for e in client.search_experiments(view_type=3)]  # 3: all, deleted too
    return {run.info.run_id for run in client.search_runs(experiments, run_view_type=3, max_results=50000)}


def test_no_bad_input_creates_an_experiment_or_run_on_a_real_mlflow_server(edge, capsys, monkeypatch,
                                                                            mlflow_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # every case that names no other store uses it
    client = MlflowClient(mlflow_server)
    experiments_before = {e.experiment_id for e in client.search_experiments(view_type=3)}
    runs_before = all_runs(client)
    codes = [exit_code(["--study", str(path)]) for path in SPEC_FILES]
    codes += [exit_code(fill(case["argv"], edge)) for case in COMMAND_LINES]
    capsys.readouterr()
    assert codes == [2] * (len(SPEC_FILES) + len(COMMAND_LINES))
    assert {e.experiment_id for e in client.search_experiments(view_type=3)} == experiments_before
    assert all_runs(client) == runs_before


def test_the_script_itself_exits_2_with_one_line_and_no_traceback(tmp_path):
    env = {key: value for key, value in os.environ.items()
           if key not in ("MLFLOW_TRACKING_URI", "GAN_STABILITY_STORAGE", "RAY_ADDRESS")}
    result = subprocess.run([sys.executable, str(REPOSITORY / "study" / "run.py"), "--study",
                             str(BAD_INPUTS / "specs" / "not_utf8.yaml")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --study ") and "cannot read it as UTF-8 text" in result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert list(tmp_path.iterdir()) == []
