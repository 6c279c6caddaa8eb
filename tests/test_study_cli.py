"""`python -m study` and `python study/run.py`: a dry run from any folder; bad input stops at the edge with
exit code 2, naming the problem, writing nothing.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from conftest import free_port

from study.run import main, summarize

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("argv", "named"), [
    (["--set", "bogus=1"], "bogus: unknown field"),
    (["--set", "max_concurrent=two"], "max_concurrent: Input should be a valid integer"),
    (["--set", "axes.beta1=[]"], "axes.beta1: an axis needs at least one value"),
    (["--set", "resources.gpu=0"], "resources.gpu: Input should be greater than 0"),
    (["--set", "resources.gpu=1.01"], "resources.gpu: Input should be less than or equal to 1"),
    (["--study", "no-such-preset"], "--study 'no-such-preset': unknown preset and not a YAML file; presets:"),
    (["--study", "missing.yaml"], "--study missing.yaml: no such file"),
    (["--set", "novalue"], "--set 'novalue': expected key=value"),
    (["--storage", "a-file/runs"], "a-file is not a folder"),
    (["--tracking-uri", "http://127.0.0.1:{port}"], "no MLflow server answered within 15 s"),
    (["--resume"], "--resume: no tracking database"),
])
def test_bad_input_exits_2_naming_the_problem_before_anything_is_written(tmp_path, monkeypatch, capsys, argv,
                                                                           named):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "a-file").write_text("")
    argv = [arg.format(port=free_port()) for arg in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]  # no mlflow.db, no runs/


# From another folder: the file (what `ray submit` runs) finds its own checkout; `-m study` finds the package
# where it is installed, here this checkout.
@pytest.mark.parametrize(("command", "environment"), [
    ([str(REPOSITORY / "study" / "run.py")], {}),
    (["-m", "study"], {"PYTHONPATH": str(REPOSITORY)}),
], ids=["study/run.py", "-m study"])
def test_dry_run_prints_the_36_default_trials_and_starts_nothing(tmp_path, command, environment):
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = subprocess.run([sys.executable, *command, "--study", "default", "--dry-run"], cwd=workdir,
                            capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **environment})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "study default (preset default): grid search, axes lr, beta1, variant, seed"
    assert "each trial: 1 CPU, 0 GPU" in lines[2]
    assert lines[3].startswith("36 trials (18 cells x 2 seeds)")
    trial_lines = [line for line in lines if line.startswith("  ")]
    assert len(trial_lines) == 36
    assert "beta1=0.5,lr=1e-2,variant=bssn  seed=1" in trial_lines[-1] and "scale=1.5" in trial_lines[-1]
    assert list(workdir.iterdir()) == []


def test_argparse_errors_also_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--no-such-flag"])
    assert stop.value.code == 2


def test_the_end_line_counts_every_outcome_and_names_the_best_trial():
    frame = pd.DataFrame({"objective": [440.5, 1e4, 1385.1], "trial_id": ["a", "b", "c"]})
    outcomes = Counter(stable=1, diverged=1, no_learning=1, running=2)  # running: no outcome yet, not ended
    assert summarize(outcomes, frame) == ("3 trials ended: 1 stable, 1 diverged, 0 collapsed, 1 no_learning, "
                                          "0 failed; best objective 440.5 (trial a)")
    # Tune counts 3 failed, MLflow holds 2: one failed before its run was created
    line = summarize(Counter(failed=2), None, failed=3)
    assert line == ("3 trials ended: 0 stable, 0 diverged, 0 collapsed, 0 no_learning, 3 failed; "
                    "no objective was reported")
