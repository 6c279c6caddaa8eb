"""The study report (analysis.report) and the command line (python -m analysis), on a real MLflow server; the
HTML is opened in headless Chromium (Debian's `chromium`: `apt-get install -y chromium`), driven by Playwright
for the checks that need the rendered page."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from synthetic_study import reference_trials, sample_grid, write_study

from analysis.__main__ import main
from analysis.report import build_report
from study.layout import REPORT_ARTIFACT_PATH

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
THEORY = "Theory: the paper's predictions beside the measurements"
GRIDS = "Sample grids: the best and the worst seed of each cell"


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
    figures = [alt for alt in images if not alt.startswith("samples ")]
    assert figures == ["heatmap_beta1_x_g_lr", "curves_variant", "theory_std", "theory_sigma_conv",
                       "theory_grad_D", "theory_grad_G", "traces"]
    assert len(images) - len(figures) == 2 * 8  # the best and worst seed of each of the 8 cells
    assert "Isolation of variant" in html and "Miyato" not in html  # the study swept no settings A-F
    titles = re.findall(r"<h2>Paper table: ([^<]+), mean ± std over every complete run</h2>", html)
    assert titles == ["best fd_digits over training", "final fd_digits", "best IS over training", "final IS"]


def test_report_header_names_the_data_network_iterations_surrogate_metric_and_divergence_policy(report):
    meta = report.read_text().split("<table class='meta'>", 1)[1].split("</table>", 1)[0]
    header = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]*)</td></tr>", meta))
    assert header["dataset"] == "digits at 32 px"
    assert header["architecture"] == "standard_cnn, width × 0.25"
    assert header["iterations"] == "500"
    assert header["metric"].startswith("fd_digits (offline surrogate") and "not FID" in header["metric"]
    assert header["divergence policy"] == (
        "record: grad_spike, d_saturation, mode_collapse; "
        "stop: nonfinite_loss, nonfinite_grad, grad_explosion, grad_vanishing, fid_blowup")


def test_theory_table_sets_each_variants_prediction_beside_its_measurement(report):
    theory = pd.read_csv(report.parent / "tables" / "theory.csv").set_index("variant")
    # sn's std holds its prediction; bsn's (the 1e-4/0.0 cell) drifts from 1 to 2; σ_conv = 1.5 σ (sn)
    assert theory.loc["sn", ["std_ratio_first", "std_ratio_last", "sigma_eff_last"]].tolist() == [1, 1, 1]
    assert theory.loc["bsn", ["std_ratio_first", "std_ratio_last"]].tolist() == [1, 2]
    assert theory.loc["sn", "conv_over_reshape_last"] == pytest.approx(1.5)
    assert theory.loc["sn", ["grad_d_last", "grad_g_last"]].tolist() == pytest.approx([0.2, 0.2])
    assert theory.loc["sn", "n_trials"] == 5 and theory.loc["bsn", "n_trials"] == 5
    assert theory.loc["sn", "prediction"].startswith("std / prediction ≈ 1 throughout")


def test_sample_grids_are_each_cells_best_and_worst_seeds_last_grid(report):
    html = report.read_text()
    shown = re.findall(r'<img alt="samples (best|worst) ([^" ]+) seed (\d+)"', html)
    cell = "beta1=0.5,g_lr=0.0001,variant=sn"  # stable seeds 0 ... 4 with finals 10, 12, ..., 18
    assert ("best", cell, "0") in shown and ("worst", cell, "4") in shown
    diverging = "beta1=0.5,g_lr=0.0001,variant=bsn"  # seeds 0-2 diverge, 3 and 4 finish with 20 and 22
    assert ("best", diverging, "3") in shown and ("worst", diverging, "2") in shown
    grids = sorted((report.parent / "samples").glob("*/iter_*.png"))
    assert len(grids) == 16 and {p.name for p in grids} == {"iter_0001000.png", "iter_0000250.png"}
    best = next(p for p in grids if np.allclose(matplotlib.image.imread(p)[..., :3], sample_grid(0, 1000),
                                                atol=1 / 255))
    assert best.name == "iter_0001000.png"  # the last of seed 0's two grids (500 and 1000)


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
        f"{REPORT_ARTIFACT_PATH}/{p.relative_to(path.parent)}" for p in path.parent.rglob("*")
        if p.is_file() and p.relative_to(path.parent).parts[0] != "samples"  # the trial runs' own artifacts
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


def rendered_images(page, heading: str) -> list[dict]:
    """Every image between the <h2> `heading` and the next <h2>, as the browser laid it out."""
    return page.evaluate(
        """heading => {
            const start = [...document.querySelectorAll('h2')].find(h => h.textContent === heading);
            const images = [];
            for (let node = start.nextElementSibling; node && node.tagName !== 'H2';
                 node = node.nextElementSibling) {
                images.push(...(node.tagName === 'IMG' ? [node] : node.querySelectorAll('img')));
            }
            return images.map(img => ({alt: img.alt, complete: img.complete, natural: img.naturalWidth,
                                       width: img.getBoundingClientRect().width,
                                       height: img.getBoundingClientRect().height}));
        }""",
        heading,
    )


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` binary on PATH (apt-get install -y chromium)")
def test_theory_section_and_sample_grids_render_in_headless_chromium(report, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(report.resolve().as_uri())
            theory, grids = rendered_images(page, THEORY), rendered_images(page, GRIDS)
            assert [image["alt"] for image in theory] == ["theory_std", "theory_sigma_conv", "theory_grad_D",
                                                          "theory_grad_G"]
            assert len(grids) == 16 and all(image["alt"].startswith("samples ") for image in grids)
            for image in theory + grids:  # decoded and laid out at a visible size
                assert image["complete"] and image["natural"] > 0, image
                assert image["width"] >= 200 and image["height"] >= 100, image
            assert page.locator("h2", has_text=THEORY).locator("xpath=following-sibling::table[1]").locator(
                "tr").count() == 1 + 2  # the header and one row per variant
            shot = page.locator("table.grids").screenshot(path=str(tmp_path / "grids.png"))
            assert len(np.unique(matplotlib.image.imread(tmp_path / "grids.png")[..., :3].reshape(-1, 3),
                                 axis=0)) > 16 and shot
        finally:
            browser.close()


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
