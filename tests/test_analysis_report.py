"""The study report (analysis.report) and the command line (python -m analysis), on a real MLflow server; the
HTML is opened in headless Chromium (Debian's `chromium`: `apt-get install -y chromium`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid

import matplotlib.image
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from synthetic_study import reference_trials, write_study

from analysis.__main__ import main
from analysis.report import build_report
from study.layout import REPORT_ARTIFACT_PATH

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def study(mlflow_server):
    name = f"report-{uuid.uuid4().hex[:8]}"
    parent_id = write_study(
        MlflowClient(mlflow_server),
        name,
        reference_trials(),
        axes=["g_lr", "beta1", "variant", "seed"],
        parent_status="running",
    )
    return name, parent_id


@pytest.fixture(scope="module")
def report(study, mlflow_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return build_report(study[0], mlflow_server, out)


def test_report_is_one_self_contained_html_file_with_embedded_figures(report):
    html = report.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing fetched from anywhere
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', html)
    assert images == ["heatmap_beta1_x_g_lr", "curves_variant", "traces"]
    assert "Isolation of variant" in html and "Miyato" not in html  # the study swept no settings A-F
    titles = re.findall(r"<h2>Paper table: ([^<]+), mean ± std over every complete run</h2>", html)
    assert titles == ["best fd_digits over training", "final fd_digits", "best IS over training", "final IS"]


def test_report_marks_a_running_study_and_its_running_and_failed_trials(report):
    html = report.read_text()
    assert "The study is running: results are partial." in html
    assert "1 trial(s) running" in html and "1 trial(s) failed" in html


def test_every_report_file_is_logged_to_the_parent_run(report, study, mlflow_server):
    path = report
    client = MlflowClient(mlflow_server)
    logged = {
        f.path
        for folder in ("", "/tables", "/figures")
        for f in client.list_artifacts(study[1], REPORT_ARTIFACT_PATH + folder)
    }
    written = {
        f"{REPORT_ARTIFACT_PATH}/{p.relative_to(path.parent)}" for p in path.parent.rglob("*") if p.is_file()
    }
    assert {
        f"{REPORT_ARTIFACT_PATH}/report.html",
        f"{REPORT_ARTIFACT_PATH}/tables/trials.parquet",
        f"{REPORT_ARTIFACT_PATH}/figures/heatmap_beta1_x_g_lr.svg",
    } <= written
    assert written <= logged


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` binary on PATH (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium_as_a_non_blank_page(report, tmp_path):
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            report.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape == (2000, 1200, 3)
    assert pixels.std() > 0.05  # text, tables and figures, not a blank page
    colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # the heatmap colour scale and the plots


def test_cli_collect_prints_progress_and_the_path_of_the_tables(study, mlflow_server, tmp_path, capsys):
    assert (
        main(["collect", "--study", study[0], "--tracking-uri", mlflow_server, "--out", str(tmp_path)]) == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("40 trials found" in line for line in lines)
    assert lines[-1] == str(tmp_path / "tables")
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == [
        "diagnostics.parquet",
        "evals.parquet",
        "events.parquet",
        "trials.parquet",
    ]


def test_cli_report_by_run_id_without_logging_prints_the_html_path(study, mlflow_server, tmp_path, capsys):
    code = main(
        ["report", "--run-id", study[1], "--tracking-uri", mlflow_server, "--out", str(tmp_path), "--no-log"]
    )
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "report.html")


def test_cli_unknown_study_exits_2_naming_it(mlflow_server, capsys):
    assert main(["report", "--study", "no-such-study", "--tracking-uri", mlflow_server]) == 2
    assert "error: no study named 'no-such-study'" in capsys.readouterr().err
