"""Per-cell aggregates, bootstrap intervals, isolation and the paper table (analysis.aggregate), checked
against the hand-computed values of the reference study (synthetic_study.reference_trials)."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from synthetic_study import reference_trials, write_study

from analysis.aggregate import AxisError, bootstrap_median_ci, cell_summary, check_axes, isolate, paper_table
from analysis.collect import collect


@pytest.fixture(scope="module")
def tables(mlflow_server):
    name = f"aggregate-{uuid.uuid4().hex[:8]}"
    write_study(
        MlflowClient(mlflow_server),
        name,
        reference_trials(),
        axes=["g_lr", "beta1", "variant", "seed"],
        parent_status="running",
    )
    return collect(mlflow_server, study=name)


@pytest.fixture(scope="module")
def summary(tables):
    return cell_summary(tables).set_index(["g_lr", "beta1", "variant"])


def test_cells_are_every_swept_axis_but_seed(summary):
    assert summary.index.names == ["g_lr", "beta1", "variant"]
    assert len(summary) == 8
    assert summary["n_seeds"].tolist() == [5] * 8


def test_cell_median_mean_std_of_final_metric_over_non_diverged_seeds(summary):
    sn = summary.loc[(1e-4, 0.5, "sn")]
    assert (sn["median"], sn["mean"]) == (14.0, 14.0)
    assert sn["std"] == pytest.approx(math.sqrt(10.0))  # sample std of 10, 12, 14, 16, 18
    bsn = summary.loc[(1e-4, 0.5, "bsn")]
    assert (bsn["median"], bsn["mean"], bsn["std"]) == (21.0, 21.0, pytest.approx(math.sqrt(2.0)))
    assert summary.loc[(2e-4, 0.0, "bsn"), "median"] == 62.0


def test_divergence_rate_and_median_divergence_step(summary):
    bsn = summary.loc[(1e-4, 0.5, "bsn")]
    assert (bsn["n_complete"], bsn["n_diverged"], bsn["divergence_rate"]) == (5, 3, 0.6)
    assert bsn["median_divergence_step"] == 700.0  # of 500, 700, 900
    assert not bsn["all_diverged"]
    assert summary.loc[(1e-4, 0.5, "sn"), "divergence_rate"] == 0.0
    assert np.isnan(summary.loc[(1e-4, 0.5, "sn"), "median_divergence_step"])


def test_cell_where_every_seed_diverged_is_flagged_with_nan_statistics(summary):
    cell = summary.loc[(2e-4, 0.5, "sn")]
    assert cell["all_diverged"] and cell["divergence_rate"] == 1.0
    assert cell["median_divergence_step"] == 300.0
    assert all(np.isnan(cell[c]) for c in ("median", "mean", "std", "ci_low", "ci_high"))
    assert cell["best"] == 40.0  # its trials' measurements before they diverged


def test_running_and_failed_trials_are_counted_but_left_out_of_rates(summary):
    cell = summary.loc[(2e-4, 0.5, "bsn")]
    assert (cell["n_complete"], cell["n_running"], cell["n_failed"], cell["n_diverged"]) == (3, 1, 1, 0)
    assert (cell["median"], cell["divergence_rate"]) == (6.0, 0.0)


def test_bootstrap_ci_of_five_distinct_finals_is_their_min_and_max(summary):
    # P(median of a 5-resample <= the smallest value) = 0.058 > 0.025, so both 95% bounds are the extremes.
    sn = summary.loc[(1e-4, 0.5, "sn")]
    assert (sn["ci_low"], sn["ci_high"]) == (10.0, 18.0)
    assert tuple(summary.loc[(2e-4, 0.5, "bsn"), ["ci_low", "ci_high"]]) == (5.0, 7.0)


def test_bootstrap_ci_of_seven_values_is_second_to_sixth_and_fixed_by_the_seed():
    # P(median <= x1) = 0.0099 < 0.025 < P(median <= x2) = 0.107 for 7-resamples: bounds are x2 and x6.
    values = np.array([3.0, 1.0, 7.0, 5.0, 2.0, 6.0, 4.0])
    assert bootstrap_median_ci(values) == (2.0, 6.0)
    assert bootstrap_median_ci(values, seed=1) == bootstrap_median_ci(values, seed=1)
    assert bootstrap_median_ci(np.array([4.0])) == (4.0, 4.0)
    assert all(np.isnan(bootstrap_median_ci(np.array([]))))


def test_bootstrap_ci_interpolates_between_resampled_medians_for_two_values():
    # Medians of 2-resamples of (0, 10) are 0, 5, 10 with probabilities 1/4, 1/2, 1/4: the bounds are the
    # extremes at any seed, and the 50% interval's bounds are the centre.
    assert bootstrap_median_ci(np.array([0.0, 10.0])) == (0.0, 10.0)
    assert bootstrap_median_ci(np.array([0.0, 10.0]), level=0.4) == (5.0, 5.0)


def test_isolation_keeps_each_variants_best_cell_over_the_nuisance_axes(tables):
    isolated = isolate(cell_summary(tables), "variant", keep=()).set_index("variant")
    assert isolated.loc["sn", ["g_lr", "beta1", "median"]].tolist() == [1e-4, 0.5, 14.0]
    assert isolated.loc["bsn", ["g_lr", "beta1", "median"]].tolist() == [2e-4, 0.5, 6.0]
    assert isolated["n_cells"].tolist() == [4, 4]


def test_isolation_per_variant_never_picks_an_all_diverged_cell(tables):
    isolated = isolate(cell_summary(tables), "g_lr", keep=("variant",)).set_index(["g_lr", "variant"])
    assert isolated.loc[(2e-4, "sn"), ["beta1", "median"]].tolist() == [0.0, 42.0]


def test_paper_table_cells_are_mean_plus_minus_std_with_divergence_counts(tables):
    table = paper_table(tables, columns="g_lr")
    # g_lr 1e-4, sn: finals 10, 12, 14, 16, 18 and 30, 31, 32, 33, 34 -> mean 23, std 9.775 (ddof 1)
    assert table.loc["sn", 1e-4] == "23 ± 9.8"
    assert table.loc["bsn", 1e-4] == "43.1 ± 15 (3/10 diverged)"  # 20, 22, 50 ... 54
    assert table.loc["sn", 2e-4] == "42 ± 1.6 (5/10 diverged)"


def test_unswept_axis_is_an_error_naming_it_and_the_valid_axes(tables):
    with pytest.raises(
        AxisError, match="axis 'beta2' was not swept by study .*; valid axes: g_lr, beta1, variant, seed"
    ):
        check_axes(tables, ["beta2", "variant"])
    with pytest.raises(AxisError, match="'nope' is not a trials column"):
        cell_summary(tables, by=["nope"])
