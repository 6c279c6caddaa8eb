"""The aggregation rules of analysis.aggregate on constructed tables: stable-only and paper statistics,
outcome counts, the bootstrap interval, the best-cell ranking, and the paper tables' keys (never pooled, never
dropped)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.aggregate import (
    AxisError,
    available_axes,
    bootstrap_median_ci,
    cell_summary,
    check_axes,
    isolate,
    paper_keys,
    paper_table,
    setting_table,
    trial_outcomes,
)
from analysis.collect import SETTINGS, StudyTables

SETTING_B = {"g_lr": 1e-4, "d_lr": 1e-4, "beta1": 0.5, "beta2": 0.999, "n_dis": 1}
SETTING_C = {**SETTING_B, "g_lr": 2e-4, "d_lr": 2e-4}
SETTING_A = {**SETTING_B, "beta2": 0.9, "n_dis": 5}


def trial(status: str = "finished", final: float = np.nan, best: float | None = None, step: int = -1,
          **config) -> dict:
    """One trials row: its config columns (SETTING_B, sn at c = 1 unless given), status and metric values."""
    return {"status": status, "final_metric": final, "best_metric": final if best is None else best,
            "divergence_step": step, **{**SETTING_B, "variant": "sn", "scale": 1.0, **config}}


def study(rows: list[dict], axes: list[str]) -> StudyTables:
    """StudyTables as analysis.collect builds them, with the columns the aggregation reads."""
    trials = pd.DataFrame(rows)
    trials["run_id"] = [f"run{i}" for i in range(len(trials))]
    trials["complete"] = trials["status"].isin(["finished", "diverged"])
    trials["diverged"] = trials["status"] == "diverged"
    for column in ("final_is", "best_is"):
        if column not in trials:
            trials[column] = np.nan
    trials["setting"] = ""
    for letter, (lr, beta1, beta2, n_dis) in SETTINGS.items():
        match = ((trials["g_lr"] == lr) & (trials["d_lr"] == lr) & (trials["beta1"] == beta1)
                 & (trials["beta2"] == beta2) & (trials["n_dis"] == n_dis))
        trials.loc[match, "setting"] = letter
    trials["cell"] = trials.apply(
        lambda row: ",".join(f"{a}={row[a]}" for a in sorted(axes) if a != "seed"), axis=1)
    empty = pd.DataFrame()
    return StudyTables(trials=trials, evals=empty, events=empty, diagnostics=empty,
                       meta={"study": "constructed", "axes": ",".join(axes), "metric": "fid"})


def seeds(values: list[float | str], **config) -> list[dict]:
    """A cell's seeds from their finals: a float is a finished run, "d<value>" a diverged one stopped with
    that final value, "d" one diverged before any evaluation, "running" and "failed" as they say."""
    rows = []
    for seed, value in enumerate(values):
        if value in ("running", "failed"):
            rows.append(trial(value, seed=seed, **config))
        elif isinstance(value, str):
            rows.append(trial("diverged", float(value[1:]) if value[1:] else np.nan, step=100 * (seed + 1),
                              seed=seed, **config))
        else:
            rows.append(trial(final=value, seed=seed, **config))
    return rows


# ---- outcomes and the statistics of a cell -------------------------------------------------------------


def test_outcomes_come_from_status_and_diverged_until_an_outcome_column_replaces_them():
    tables = study(seeds([10.0, "d40", "running", "failed"]), ["variant", "seed"])
    assert trial_outcomes(tables.trials).tolist() == ["stable", "diverged", "running", "failed"]
    tables.trials["outcome"] = ["collapsed", "diverged", "running", "failed"]
    assert trial_outcomes(tables.trials).tolist() == ["collapsed", "diverged", "running", "failed"]


def test_stable_only_statistics_are_over_the_stable_seeds_and_paper_ones_over_every_complete_run():
    tables = study(seeds([10.0, 12.0, 14.0, "d50", "d", "running", "failed"]), ["variant", "seed"])
    [cell] = cell_summary(tables).to_dict("records")
    assert (cell["n_seeds"], cell["n_complete"], cell["n_stable"], cell["n_diverged"]) == (7, 5, 3, 2)
    assert (cell["n_running"], cell["n_failed"]) == (1, 1)
    assert (cell["median"], cell["mean"], cell["std"]) == (12.0, 12.0, 2.0)
    assert (cell["stable_rate"], cell["divergence_rate"]) == (0.6, 0.4)
    # the paper's: 10, 12, 14 and the diverged run's 50; the run that diverged before any evaluation has none
    assert (cell["n_paper"], cell["paper_mean"]) == (4, 21.5)
    assert cell["paper_std"] == pytest.approx(np.std([10, 12, 14, 50], ddof=1))
    assert cell["median_divergence_step"] == 450.0  # seeds 3 and 4 diverged at 400 and 500


def test_an_outcome_column_moves_collapsed_runs_out_of_the_stable_statistics_but_not_the_papers():
    tables = study(seeds([10.0, 12.0, 30.0]), ["variant", "seed"])
    tables.trials["outcome"] = ["stable", "stable", "collapsed"]
    [cell] = cell_summary(tables).to_dict("records")
    assert (cell["n_complete"], cell["n_stable"], cell["n_collapsed"], cell["mean"]) == (3, 2, 1, 11.0)
    assert cell["paper_mean"] == pytest.approx(52 / 3)


def test_cell_where_every_seed_diverged_has_nan_stable_statistics_and_its_best_before_diverging():
    rows = [trial("diverged", 400.0, best=40.0, step=300, seed=0),
            trial("diverged", 500.0, best=45.0, step=300, seed=1)]
    [cell] = cell_summary(study(rows, ["variant", "seed"])).to_dict("records")
    assert cell["all_diverged"] and cell["divergence_rate"] == 1.0 and cell["stable_rate"] == 0.0
    assert all(np.isnan(cell[c]) for c in ("median", "mean", "std", "ci_low", "ci_high"))
    assert (cell["paper_mean"], cell["best"]) == (450.0, 40.0)


def test_best_and_final_values_are_summarised_each_from_their_own_column():
    rows = [trial(final=30.0, best=20.0, seed=0), trial(final=50.0, best=22.0, seed=1)]
    tables = study(rows, ["variant", "seed"])
    assert cell_summary(tables, value="final_metric")["paper_mean"].item() == 40.0
    assert cell_summary(tables, value="best_metric")["paper_mean"].item() == 21.0


def test_bootstrap_ci_of_five_distinct_finals_is_their_min_and_max():
    # P(median of a 5-resample <= the smallest value) = 0.058 > 0.025, so both 95% bounds are the extremes.
    tables = study(seeds([14.0, 10.0, 18.0, 12.0, 16.0]), ["variant", "seed"])
    [cell] = cell_summary(tables).to_dict("records")
    assert (cell["ci_low"], cell["ci_high"]) == (10.0, 18.0)


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


# ---- the best-cell ranking -----------------------------------------------------------------------------


def lr_study() -> StudyTables:
    """sn over three learning rates: 1e-4 stable at 30; 2e-4 at 10 but 3 of 5 diverged; 5e-4 at 20 with 1 of
    5 diverged."""
    return study(seeds([29.0, 30.0, 31.0, 30.0, 30.0], g_lr=1e-4)
                 + seeds([10.0, 10.0, "d90", "d95", "d99"], g_lr=2e-4)
                 + seeds([18.0, 20.0, 22.0, 40.0, "d80"], g_lr=5e-4), ["g_lr", "variant", "seed"])


def test_rank_value_counts_each_unstable_seed_as_the_worst_value():
    summary = cell_summary(lr_study()).set_index("g_lr")
    assert summary.loc[1e-4, "rank_value"] == 30.0
    assert summary.loc[2e-4, "rank_value"] == math.inf  # 3 of 5 at +inf: the median is one of them
    assert summary.loc[5e-4, "rank_value"] == 22.0  # median of 18, 20, 22, 40, +inf
    assert summary.loc[2e-4, "median"] == 10.0  # the survivors' median alone would win


def test_best_cell_accounts_for_the_outcome_rate_not_the_survivors_alone():
    [best] = isolate(cell_summary(lr_study()), "variant", keep=()).to_dict("records")
    assert (best["g_lr"], best["rank_value"], best["n_cells"]) == (5e-4, 22.0, 3)


def test_ranking_ties_among_mostly_unstable_cells_go_to_the_higher_stable_rate():
    tables = study(seeds([10.0, "d", "d", "d"], g_lr=1e-4) + seeds([30.0, 31.0, "d", "d"], g_lr=2e-4),
                   ["g_lr", "variant", "seed"])
    [best] = isolate(cell_summary(tables), "variant", keep=()).to_dict("records")
    assert (best["g_lr"], best["rank_value"], best["stable_rate"]) == (2e-4, math.inf, 0.5)


def test_inception_score_ranks_higher_as_better_and_an_unstable_seed_as_minus_infinity():
    rows = [{**row, "final_is": row["final_metric"]}
            for row in seeds([5.0, 5.0, 5.0], g_lr=1e-4) + seeds([9.0, 9.0, "d1"], g_lr=2e-4)]
    summary = cell_summary(study(rows, ["g_lr", "variant", "seed"]), value="final_is")
    assert summary.set_index("g_lr").loc[2e-4, "rank_value"] == 9.0
    [best] = isolate(summary, "variant", keep=(), higher_is_better=True).to_dict("records")
    assert best["g_lr"] == 2e-4
    rows = [{**row, "final_is": row["final_metric"]} for row in seeds(["d1", "d1", 9.0])]
    assert cell_summary(study(rows, ["variant", "seed"]), value="final_is")["rank_value"].item() == -math.inf


# ---- the paper tables ----------------------------------------------------------------------------------


def paper_study() -> StudyTables:
    """A paper-preset study in miniature: sn at two lr pairs (one with g_lr != d_lr), n_dis 5, and ssn at two
    scales, the optimiser bundle as a label axis (`optimizer`) as the presets sweep it."""
    rows = (seeds([10.0, 12.0, 14.0], optimizer="b999")
            + seeds([20.0, 22.0, "d60"], g_lr=2e-4, optimizer="b999")
            + seeds([30.0, 30.0, 30.0], **SETTING_A, optimizer="b9")
            + seeds([8.0, 9.0, 10.0], variant="ssn", scale=0.7, optimizer="b999")
            + seeds([40.0, "d100", "running"], variant="ssn", scale=2.0, optimizer="b999"))
    return study(rows, ["g_lr", "d_lr", "optimizer", "variant", "scale", "seed"])


def test_paper_table_rows_are_variant_by_c_and_columns_the_full_optimiser_setting():
    table = paper_table(paper_study(), value="final_metric")
    assert table.index.names == ["variant", "scale"] and table.columns.names == list(SETTING_B)
    assert table.index.tolist() == [("sn", 1.0), ("ssn", 0.7), ("ssn", 2.0)]  # c never pooled
    b, a = tuple(SETTING_B.values()), tuple(SETTING_A.values())
    mixed = (2e-4, 1e-4, 0.5, 0.999, 1)  # g_lr != d_lr: a column of its own, not dropped
    assert set(table.columns) == {b, a, mixed}
    assert table.loc[("sn", 1.0), b] == "12 ± 2"
    assert table.loc[("sn", 1.0), mixed] == f"34 ± {np.std([20, 22, 60], ddof=1):.2g} [stable 2/3: 21 ± 1.4]"
    assert table.loc[("sn", 1.0), a] == "30 ± 0"
    assert table.loc[("ssn", 2.0), b] == "70 ± 42 [stable 1/2: 40] (1 running)"
    assert table.loc[("ssn", 0.7), a] == ""  # no such cell in the grid


def test_paper_table_holds_every_cell_of_the_study_once():
    tables = paper_study()
    table = paper_table(tables, value="final_metric")
    assert (table != "").to_numpy().sum() == tables.trials["cell"].nunique() == 5


def test_a_swept_axis_that_separates_cells_becomes_a_row_key_and_a_label_axis_does_not():
    rows = seeds([10.0, 11.0], batch_size=64, optimizer="b999") + seeds([20.0, 21.0], batch_size=32,
                                                                         optimizer="b999")
    tables = study(rows, ["optimizer", "batch_size", "variant", "seed"])
    assert paper_keys(tables) == (["variant", "scale", "batch_size"], list(SETTING_B))
    assert paper_table(tables, value="final_metric").index.tolist() == [("sn", 1.0, 32), ("sn", 1.0, 64)]


def test_a_study_that_meets_a_miyato_setting_by_chance_gets_no_setting_table():
    tables = paper_study()  # its (1e-4, 1e-4) and (2e-4, 2e-4)-free grid holds settings A and B, and a mix
    assert set(tables.trials["setting"]) == {"A", "B", ""}
    assert setting_table(tables) is None and "setting" not in available_axes(tables)
    with pytest.raises(AxisError, match="axis 'setting' was not swept"):
        check_axes(tables, ["setting"])


def test_a_study_that_swept_miyato_settings_gets_the_setting_table():
    rows = (seeds([10.0, 12.0], **SETTING_A) + seeds([20.0, 24.0], **SETTING_B)
            + seeds([30.0, "d90"], **SETTING_C)
            + seeds([11.0, 13.0], **SETTING_A, variant="bsn"))
    tables = study(rows, ["setting", "variant", "seed"])
    assert "setting" in available_axes(tables)
    table = setting_table(tables, value="final_metric")
    assert table.columns.tolist() == ["A", "B", "C"] and table.index.tolist() == [("bsn", 1.0), ("sn", 1.0)]
    assert table.loc[("sn", 1.0), "C"] == f"60 ± {np.std([30, 90], ddof=1):.2g} [stable 1/2: 30]"
    assert table.loc[("bsn", 1.0), "B"] == ""


def test_unswept_axis_is_an_error_naming_it_and_the_valid_axes():
    tables = lr_study()
    with pytest.raises(AxisError, match="axis 'beta2' was not swept by study .*; valid axes: g_lr, variant, "
                                        "seed"):
        check_axes(tables, ["beta2", "variant"])
    with pytest.raises(AxisError, match="'nope' is not a trials column"):
        cell_summary(tables, by=["nope"])
