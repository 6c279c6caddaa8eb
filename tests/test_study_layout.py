"""The MLflow layout that study/ writes and analysis/ reads: its keys, search filters and purity."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from study import layout
from trainables.config import TRIAL_OUTCOMES

REPOSITORY = Path(__file__).resolve().parent.parent


def test_flatten_gives_dotted_keys_and_json_values():
    assert layout.flatten({"divergence": {"grad_explosion": 1e4}, "metrics": ["fid", "is"], "variant": "sn",
                           "inception_weights": None, "compile": False, "policy": {}}) == {
        "divergence.grad_explosion": "10000.0", "metrics": '["fid", "is"]', "variant": "sn",
        "inception_weights": "null", "compile": "false", "policy": "{}"}


def test_cell_key_sorts_axis_names_and_leaves_out_the_seed_and_parses_back():
    cell = layout.cell_key({"variant": "sn", "g_lr": 0.0002, "seed": 3})
    assert cell == "g_lr=0.0002,variant=sn"
    assert layout.parse_cell(cell) == {"g_lr": "0.0002", "variant": "sn"}



def test_a_trial_run_name_reads_variant_first_then_the_swept_values_in_the_specs_order():
    point = {"lr": "1e-3", "beta1": 0.5, "variant": "bssn", "seed": 1}
    assert layout.trial_run_name(point, 1, "bssn") == "bssn lr=1e-3 beta1=0.5 seed=1"
    assert layout.trial_run_name({"g_lr": 0.000123456789}, 0, "sn") == "sn g_lr=0.0001235 seed=0"
    assert layout.trial_run_name({}, 0, "none") == "none seed=0"


def test_tag_filter_finds_values_with_either_quote_and_refuses_both(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("filters")
    values = ["plain", "miyato's B", 'the "wide" net']
    runs = {value: client.create_run(experiment, tags={layout.CELL_TAG: value, layout.PARENT_RUN_ID_TAG: "p"})
            for value in values}
    for value, run in runs.items():
        found = client.search_runs([experiment], layout.tag_filter({layout.CELL_TAG: value,
                                                                    layout.PARENT_RUN_ID_TAG: "p"}))
        assert [r.info.run_id for r in found] == [run.info.run_id], value
    with pytest.raises(ValueError, match="both quote characters"):
        layout.tag_filter({layout.CELL_TAG: """it's "both" """})


def test_every_ended_status_closes_its_run_and_only_those_count_as_ended():
    assert set(layout.MLFLOW_END_STATUS) == set(layout.TRIAL_STATUSES) - {layout.RUNNING}
    assert set(layout.ENDED_STATUSES) <= set(layout.TRIAL_STATUSES)
    assert layout.MLFLOW_END_STATUS[layout.DIVERGED] == "FINISHED"  # a divergence is a result


def test_outcome_is_the_tag_else_what_the_status_and_the_mlflow_state_say():
    assert layout.OUTCOMES == (*TRIAL_OUTCOMES, layout.FAILED)  # the trial's verdicts, and a crash
    ended = {layout.STATUS_TAG: layout.FINISHED, layout.DIVERGED_TAG: "0"}
    assert layout.outcome({**ended, layout.OUTCOME_TAG: layout.NO_LEARNING}) == "no_learning"
    # runs without the tag: ASHA stopped it early, or it was written before outcomes were tagged
    assert layout.outcome(ended) == "stable"
    assert layout.outcome({layout.STATUS_TAG: layout.DIVERGED, layout.DIVERGED_TAG: "1"}) == "diverged"
    assert layout.outcome({layout.STATUS_TAG: layout.FAILED}, "FAILED") == "failed"
    # cut off by its driver's end (Ctrl+C, a dead driver's runs closed later): no verdict, --resume goes on
    assert layout.outcome({layout.STATUS_TAG: layout.KILLED}, "KILLED") == "running"
    assert layout.outcome({layout.STATUS_TAG: layout.RUNNING}, "KILLED") == "running"
    assert layout.outcome({layout.STATUS_TAG: layout.RUNNING}, "RUNNING") == "running"
    assert layout.outcome({}, "RUNNING") == "running"


def test_layout_imports_neither_mlflow_nor_ray_nor_torch():
    code = ("import sys, study.layout; heavy = {'mlflow', 'ray', 'torch'} & set(sys.modules); "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPOSITORY)})
    assert result.returncode == 0, result.stderr


def test_the_review_view_lists_the_trials_by_primary_metric_variant_first_then_the_swept_params():
    view = layout.review_view(["g_lr", "d_lr", "beta1", "variant", "scale"])
    assert view["searchFilter"] == "tags.`role` = 'trial'"
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`primary_metric`", True)
    assert view["selectedColumns"] == view["columnOrder"] == [
        "params.`variant`", "params.`g_lr`", "params.`d_lr`", "params.`beta1`", "params.`scale`",
        "tags.`outcome`", "tags.`status`", "tags.`divergence_cause`", "tags.`divergence_step`",
        "tags.`metric`", "metrics.`primary_metric`", "metrics.`iteration`"]
    assert layout.review_path("7") == ("/#/experiments/7/runs?workflowType=machine_learning"
                                       "&viewStateShareKey=review")
