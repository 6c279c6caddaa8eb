"""Collecting a study from a real MLflow server into tidy tables and Parquet (analysis.collect)."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from synthetic_study import SyntheticTrial, reference_trials, write_study

from analysis.collect import MetricReader, StudyLookupError, StudyTables, collect
from analysis.schema import TABLES

AXES = ["g_lr", "beta1", "variant", "seed"]


@pytest.fixture(scope="module")
def study(mlflow_server):
    """The reference study (synthetic_study.reference_trials), still running, collected once."""
    name = f"reference-{uuid.uuid4().hex[:8]}"
    parent_id = write_study(
        MlflowClient(mlflow_server), name, reference_trials(), axes=AXES, parent_status="running"
    )
    return name, parent_id, collect(mlflow_server, study=name)


def row(tables: StudyTables, g_lr: float, beta1: float, variant: str, seed: int):
    t = tables.trials
    match = t[(t["g_lr"] == g_lr) & (t["beta1"] == beta1) & (t["variant"] == variant) & (t["seed"] == seed)]
    assert len(match) == 1
    return match.iloc[0]


def test_trials_table_has_one_row_per_trial_with_statuses_of_running_study(study):
    _, _, tables = study
    assert len(tables.trials) == 40
    assert tables.trials["status"].value_counts().to_dict() == {
        "finished": 30,
        "diverged": 8,
        "running": 1,
        "failed": 1,
    }
    assert tables.meta["study_status"] == "running"
    assert not row(tables, 2e-4, 0.5, "bsn", 4)["complete"]
    assert row(tables, 2e-4, 0.5, "bsn", 4)["mlflow_status"] == "FAILED"
    assert np.isnan(row(tables, 2e-4, 0.5, "bsn", 3)["wall_time_s"])
    assert row(tables, 1e-4, 0.5, "sn", 0)["wall_time_s"] == 60.0


def test_divergence_cause_and_step_come_from_the_trial_tags(study):
    _, _, tables = study
    trial = row(tables, 1e-4, 0.5, "bsn", 1)
    assert (trial["diverged"], trial["divergence_cause"], trial["divergence_step"]) == (
        True,
        "grad_explosion",
        700,
    )
    assert trial["final_objective"] == 1e4  # the documented penalty of a stopped trial
    fine = row(tables, 1e-4, 0.5, "sn", 0)
    assert (fine["diverged"], fine["divergence_cause"], fine["divergence_step"]) == (False, "", -1)


def test_final_and_best_metric_and_is_kid_come_from_the_evaluations(study):
    _, _, tables = study
    trial = row(tables, 1e-4, 0.5, "sn", 2)
    assert trial["metric"] == "fd_digits"
    assert (trial["final_metric"], trial["best_metric"], trial["best_metric_iteration"]) == (14.0, 14.0, 1000)
    assert (trial["final_is"], trial["best_is"], trial["final_kid"], trial["best_kid"]) == (
        5.0,
        5.0,
        0.01,
        0.01,
    )
    assert (trial["n_evals"], trial["last_iteration"]) == (2, 1000)
    diverged = row(tables, 1e-4, 0.5, "bsn", 0)
    assert (diverged["final_metric"], diverged["n_evals"], diverged["last_iteration"]) == (40.0, 1, 500)


def test_evals_have_one_row_per_trial_and_evaluation_step(study):
    _, _, tables = study
    # 37 trials with 2 evaluations or 1 (running: 1, diverged: evaluation at 250 + final report at the step)
    assert len(tables.evals) == 31 * 2 + 1 + 8 * 2
    trial = row(tables, 1e-4, 0.5, "sn", 4)
    evals = tables.evals[tables.evals["run_id"] == trial["run_id"]]
    assert evals[["iteration", "metric", "fd_digits", "objective"]].to_numpy().tolist() == [
        [500, 28.0, 28.0, 28.0],
        [1000, 18.0, 18.0, 18.0],
    ]


def test_config_columns_are_typed_from_trial_config_defaults(study):
    _, _, tables = study
    dtypes = tables.trials.dtypes
    assert (dtypes["g_lr"], dtypes["seed"], dtypes["n_dis"], dtypes["divergence.grad_explosion"]) == (
        "float64",
        "int64",
        "int64",
        "float64",
    )
    assert dtypes["sn_grad_through_power_iteration"] == np.dtype(bool)
    assert set(tables.trials["variant"]) == {"sn", "bsn"}
    assert tables.axes == AXES


def test_diagnostics_split_key_into_quantity_network_and_layer(study):
    _, _, tables = study
    keys = tables.diagnostics.drop_duplicates("key").set_index("key")
    assert keys.loc["grad_norm/D/blocks.0", ["quantity", "network", "layer"]].tolist() == [
        "grad_norm",
        "D",
        "blocks.0",
    ]
    assert keys.loc["grad_norm/G", ["quantity", "network", "layer"]].tolist() == ["grad_norm", "G", ""]
    assert keys.loc["sigma/blocks.0", ["quantity", "network", "layer"]].tolist() == ["sigma", "", "blocks.0"]
    assert keys.loc["grad_x_real/mean", ["quantity", "network", "layer"]].tolist() == [
        "grad_x_real",
        "",
        "mean",
    ]
    sigma = tables.diagnostics[(tables.diagnostics["key"] == "sigma/blocks.0")]
    assert len(sigma) == 5 * 21  # five trials, every 50 iterations from 0 to 1000
    assert np.allclose(sigma["value"], 1.0 + sigma["iteration"] / 1000)


def test_diagnostics_are_downsampled_to_max_points_keeping_first_and_last(study, mlflow_server):
    name, _, _ = study
    tables = collect(mlflow_server, study=name, max_points=5)
    per_trial = tables.diagnostics[tables.diagnostics["key"] == "sigma/blocks.0"].groupby("run_id")[
        "iteration"
    ]
    assert per_trial.size().tolist() == [5] * 5
    assert (per_trial.min() == 0).all() and (per_trial.max() == 1000).all()


def test_per_run_reader_returns_the_same_histories_as_the_bulk_rest_reader(study, mlflow_server):
    _, _, tables = study
    client = MlflowClient(mlflow_server)
    keys_by_run = {r: {"fd_digits", "objective"} for r in tables.trials["run_id"].head(6)}
    bulk = MetricReader(client, mlflow_server).histories(keys_by_run, ["fd_digits", "objective"], 100)
    single = MetricReader(client, mlflow_server, bulk=False).histories(
        keys_by_run, ["fd_digits", "objective"], 100
    )
    order = ["run_id", "key", "iteration"]
    assert len(bulk) > 0
    assert (
        bulk.sort_values(order)
        .reset_index(drop=True)
        .equals(single.sort_values(order).reset_index(drop=True))
    )


def test_events_table_has_one_row_per_event_of_events_json(study):
    _, _, tables = study
    assert len(tables.events) == 8
    assert tables.events["cause"].value_counts().to_dict() == {"nonfinite_loss": 5, "grad_explosion": 3}
    first = tables.events.sort_values("iteration").iloc[0]
    assert (first["iteration"], first["action"]) == (100, "stop")
    assert json.loads(first["values"]) == {"grad_norm/D": 1e5}


def test_parquet_files_follow_the_documented_schema_and_carry_the_study_metadata(study, tmp_path):
    _, parent_id, tables = study
    paths = tables.write_parquet(tmp_path)
    for name, columns in TABLES.items():
        schema = pq.read_schema(paths[name])
        for column, (dtype, doc) in columns.items():
            assert schema.field(column).type == dtype, (name, column)
            assert schema.field(column).metadata[b"doc"] == doc.encode()
        assert schema.metadata[b"parent_run_id"] == parent_id.encode()
    back = StudyTables.read_parquet(tmp_path)
    assert back.meta == tables.meta
    assert back.trials[["run_id", "status", "final_metric", "g_lr", "seed"]].equals(
        tables.trials[["run_id", "status", "final_metric", "g_lr", "seed"]]
    )
    assert len(back.evals) == len(tables.evals) and len(back.diagnostics) == len(tables.diagnostics)


def test_study_found_by_parent_run_id_is_the_same_as_by_name(study, mlflow_server):
    name, parent_id, tables = study
    by_id = collect(mlflow_server, run_id=parent_id)
    assert by_id.meta["study"] == name
    assert sorted(by_id.trials["run_id"]) == sorted(tables.trials["run_id"])


def test_unknown_study_error_names_it_and_lists_the_known_studies(study, mlflow_server):
    name, _, _ = study
    with pytest.raises(
        StudyLookupError, match=rf"no study named 'nope' at {mlflow_server}; studies there: .*{name}"
    ):
        collect(mlflow_server, study="nope")


def test_unknown_run_id_and_a_trial_run_id_are_clear_errors(study, mlflow_server):
    _, _, tables = study
    with pytest.raises(StudyLookupError, match="run id 'deadbeef' not found"):
        collect(mlflow_server, run_id="deadbeef")
    trial_id = tables.trials["run_id"].iat[0]
    with pytest.raises(
        StudyLookupError, match=f"run {trial_id} is not a study's parent run: its tag role is 'trial'"
    ):
        collect(mlflow_server, run_id=trial_id)


def test_empty_study_is_a_clear_error(mlflow_server):
    name = f"empty-{uuid.uuid4().hex[:8]}"
    write_study(MlflowClient(mlflow_server), name, [], axes=["variant", "seed"])
    with pytest.raises(StudyLookupError, match=rf"study '{name}' \(parent run \w+\) has no trial runs yet"):
        collect(mlflow_server, study=name)


def test_setting_letter_is_matched_from_the_optimiser_axes(mlflow_server):
    name = f"settings-{uuid.uuid4().hex[:8]}"
    optimisers = {"A": (1e-4, 0.5, 0.9, 5), "F": (1e-3, 0.9, 0.999, 5), "": (3e-4, 0.5, 0.9, 5)}
    trials = [
        SyntheticTrial(
            axes={"g_lr": lr, "d_lr": lr, "beta1": b1, "beta2": b2, "n_dis": n, "seed": 0}, evals=[(500, 1.0)]
        )
        for lr, b1, b2, n in optimisers.values()
    ]
    write_study(
        MlflowClient(mlflow_server), name, trials, axes=["g_lr", "d_lr", "beta1", "beta2", "n_dis", "seed"]
    )
    tables = collect(mlflow_server, study=name)
    assert sorted(tables.trials["setting"]) == ["", "A", "F"]
    assert tables.trials.set_index("setting").loc["F", "g_lr"] == 1e-3


def test_a_bundle_axis_gets_a_column_from_the_cell_tag_and_splits_the_cells(mlflow_server):
    from analysis.aggregate import cell_summary

    trials = [
        SyntheticTrial(axes={"variant": variant, "seed": seed}, bundles={"lr": label},
                       config={"g_lr": lr, "d_lr": lr}, evals=[(100, value + seed)])
        for label, lr, value in (("1e-4", 1e-4, 10.0), ("1e-3", 1e-3, 50.0))
        for variant in ("none", "sn") for seed in (0, 1)
    ]
    name = f"bundle-{uuid.uuid4().hex[:8]}"
    write_study(MlflowClient(mlflow_server), name, trials, axes=["lr", "variant", "seed"])
    tables = collect(mlflow_server, study=name)
    assert sorted(tables.trials["lr"].unique()) == [1e-4, 1e-3]
    summary = cell_summary(tables)
    assert len(summary) == 4  # lr x variant, not variant alone
    medians = {(r.lr, r.variant): r.median for r in summary.itertuples()}
    assert medians == {(1e-4, "none"): 10.5, (1e-4, "sn"): 10.5, (1e-3, "none"): 50.5, (1e-3, "sn"): 50.5}
