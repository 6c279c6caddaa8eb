"""Stability heatmaps, curves and traces (analysis.figures): what is drawn is checked against its data."""

from __future__ import annotations

import uuid

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle
from mlflow.tracking import MlflowClient
from synthetic_study import SyntheticTrial, reference_trials, write_study

from analysis.aggregate import AxisError
from analysis.collect import collect
from analysis.figures import (
    CMAP,
    OUTCOME_STYLE,
    cell_label,
    choose_trials,
    curve_data,
    heatmap_data,
    plot_curves,
    plot_heatmaps,
    plot_layer_trends,
    plot_traces,
    report_pairs,
    save,
    trace_data,
)
from analysis.theory import conv_ratio_trends, gradient_trends, std_ratio_trends


@pytest.fixture(scope="module")
def tables(mlflow_server):
    name = f"figures-{uuid.uuid4().hex[:8]}"
    write_study(
        MlflowClient(mlflow_server), name, reference_trials(), axes=["g_lr", "beta1", "variant", "seed"]
    )
    return collect(mlflow_server, study=name)


@pytest.fixture(scope="module")
def heatmap(tables):
    data = heatmap_data(tables, "g_lr", "beta1")
    fig = plot_heatmaps(data, "fd_digits")
    fig.canvas.draw()
    yield data, fig
    plt.close(fig)


def texts_by_cell(ax) -> dict[tuple[int, int], str]:
    """Annotation texts keyed by (row, column) of the cell they sit in."""
    return {(int(t.get_position()[1]), int(t.get_position()[0])): t.get_text() for t in ax.texts}


def test_heatmap_pivot_holds_the_cell_medians_and_outcome_counts(heatmap):
    data, _ = heatmap
    assert data.panel == "variant" and list(data.median) == ["bsn", "sn"]
    sn = data.median["sn"]
    assert sn.index.tolist() == [0.0, 0.5] and sn.columns.tolist() == [1e-4, 2e-4]
    assert sn.loc[0.5, 1e-4] == 14.0 and np.isnan(sn.loc[0.5, 2e-4]) and sn.loc[0.0, 2e-4] == 42.0
    assert data.labels["bsn"].loc[0.5, 1e-4] == "21\n2/5 stable\n3 diverged"
    assert data.labels["sn"].loc[0.5, 2e-4] == "0/5 stable\n5 diverged"
    assert data.labels["bsn"].loc[0.5, 2e-4] == "6\n3/3 stable"  # running and failed seeds left out
    assert data.n_stable["bsn"].loc[0.5, 2e-4] == 3 and data.n_complete["bsn"].loc[0.5, 1e-4] == 5
    assert data.unstable["sn"].loc[0.5, 2e-4] == "diverged" and data.unstable["bsn"].loc[0.5, 1e-4] == ""
    assert (data.vmin, data.vmax) == (6.0, 62.0)  # shared by both panels


def test_every_drawn_annotation_is_the_label_of_its_cell(heatmap):
    data, fig = heatmap
    panels = [ax for ax in fig.axes if ax.get_title().startswith("variant = ")]
    assert [ax.get_title() for ax in panels] == ["variant = bsn", "variant = sn"]
    for ax, name in zip(panels, ["bsn", "sn"], strict=True):
        expected = {(i, j): label for (i, j), label in np.ndenumerate(data.labels[name].to_numpy())}
        assert texts_by_cell(ax) == expected


def test_drawn_cell_colours_follow_one_shared_scale_of_the_medians(heatmap):
    data, fig = heatmap
    panels = [ax for ax in fig.axes if ax.get_title().startswith("variant = ")]
    cmap = plt.get_cmap(CMAP)
    for ax, name in zip(panels, ["bsn", "sn"], strict=True):
        mesh = ax.collections[0]
        assert (mesh.norm.vmin, mesh.norm.vmax) == (6.0, 62.0)
        medians = data.median[name].to_numpy().ravel()
        shown = ~np.isnan(medians)
        assert (~np.ma.getmaskarray(mesh.get_array()).ravel() == shown).all()  # NaN cells are not painted
        assert np.allclose(mesh.get_facecolors()[shown], cmap((medians[shown] - 6.0) / 56.0), atol=1e-6)
    colorbars = [ax for ax in fig.axes if not ax.get_title().startswith("variant = ")]
    assert len(colorbars) == 1


def test_cells_where_every_seed_diverged_are_hatched_grey(heatmap):
    _, fig = heatmap
    sn = next(ax for ax in fig.axes if ax.get_title() == "variant = sn")
    bsn = next(ax for ax in fig.axes if ax.get_title() == "variant = bsn")
    marked = [p for p in sn.patches if isinstance(p, Rectangle) and p.get_hatch()]
    assert [(p.get_x(), p.get_y()) for p in marked] == [(1.0, 1.0)]  # column g_lr=2e-4, row beta1=0.5
    assert (marked[0].get_facecolor(), marked[0].get_hatch()) == (to_rgba(OUTCOME_STYLE["diverged"][0]), "xx")
    assert not [p for p in bsn.patches if p.get_hatch()]


def test_cell_labels_count_the_stable_seeds_and_name_the_other_outcomes():
    assert cell_label(14.0, {"stable": 5}) == "14\n5/5 stable"
    assert cell_label(21.0, {"stable": 1, "diverged": 2, "collapsed": 1, "no_learning": 1}) == (
        "21\n1/5 stable\n2 diverged\n1 collapsed\n1 no_learning")
    assert cell_label(float("nan"), {"no_learning": 4}) == "0/4 stable\n4 no_learning"
    assert cell_label(float("nan"), {}, n_running=2) == "2 running"


def test_cells_without_a_stable_seed_are_painted_as_their_most_common_outcome(mlflow_server):
    def cell(g_lr: float, outcomes: list[str]) -> list[SyntheticTrial]:
        return [SyntheticTrial(axes={"g_lr": g_lr, "beta1": 0.5, "seed": seed}, evals=[(100, 50.0 + seed)],
                               status="diverged" if outcome == "diverged" else "finished", outcome=outcome,
                               divergence_step=100 if outcome == "diverged" else -1)
                for seed, outcome in enumerate(outcomes)]

    name = f"outcomes-{uuid.uuid4().hex[:8]}"
    trials = (cell(1e-4, ["stable", "collapsed", "no_learning"])
              + cell(2e-4, ["collapsed", "collapsed", "diverged"])
              + cell(5e-4, ["no_learning", "diverged", "no_learning"])
              + cell(1e-3, ["diverged", "collapsed"]))  # a tie: diverged, the first of UNSTABLE_OUTCOMES
    write_study(MlflowClient(mlflow_server), name, trials, axes=["g_lr", "beta1", "seed"])
    data = heatmap_data(collect(mlflow_server, study=name), "g_lr", "beta1")
    assert data.unstable["all"].loc[0.5].tolist() == ["", "collapsed", "no_learning", "diverged"]
    assert data.labels["all"].loc[0.5, 1e-4] == "50\n1/3 stable\n1 collapsed\n1 no_learning"
    fig = plot_heatmaps(data, "fd_digits")
    [ax] = [a for a in fig.axes if a.get_xlabel() == "g_lr"]
    painted = {int(p.get_x()): (p.get_facecolor(), p.get_hatch()) for p in ax.patches if p.get_hatch()}
    assert painted == {column: (to_rgba(OUTCOME_STYLE[o][0]), OUTCOME_STYLE[o][1])
                       for column, o in ((1, "collapsed"), (2, "no_learning"), (3, "diverged"))}
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        f"no stable seed: mostly {o}" for o in ("diverged", "collapsed", "no_learning")]
    plt.close(fig)


def test_heatmap_of_an_axis_the_study_did_not_sweep_is_an_error(tables):
    with pytest.raises(AxisError, match="axis 'n_dis' was not swept"):
        heatmap_data(tables, "g_lr", "n_dis")
    with pytest.raises(ValueError, match="two different axes"):
        heatmap_data(tables, "g_lr", "g_lr")
    single = heatmap_data(tables, "g_lr", "variant")
    assert single.panel is None and list(single.median) == ["all"]


def test_report_draws_the_swept_pairs_and_no_setting_axis_met_by_chance(tables):
    # g_lr = 2e-4 at beta1 0.5 (beta2 0.999, n_dis 1) is Miyato et al.'s setting C, but the study swept g_lr
    # and beta1, not the settings: no variant x setting heatmap, which would read as the headline
    setting_c = tables.trials[tables.trials["setting"] == "C"]
    assert len(setting_c) == 10 and set(setting_c["g_lr"]) == {2e-4} and set(setting_c["beta1"]) == {0.5}
    assert report_pairs(tables) == [("g_lr", "beta1")]
    with pytest.raises(AxisError, match="axis 'setting' was not swept"):
        heatmap_data(tables, "setting", "variant")


def test_curves_show_the_best_cell_per_variant_with_a_min_max_seed_band(tables):
    curves = curve_data(tables).set_index(["variant", "iteration"])
    # sn's best cell: g_lr 1e-4, beta1 0.5, finals 10..18 and 20..28 at iteration 500
    assert curves.loc[("sn", 1000), ["median", "low", "high", "n_seeds"]].tolist() == [14.0, 10.0, 18.0, 5]
    assert curves.loc[("sn", 500), ["median", "low", "high"]].tolist() == [24.0, 20.0, 28.0]
    assert curves.loc[("bsn", 1000), ["median", "low", "high", "n_seeds"]].tolist() == [6.0, 5.0, 7.0, 3]
    fig = plot_curves(curve_data(tables), metric="fd_digits")
    lines = {line.get_label().split(" ")[0]: line for line in fig.axes[0].lines}
    assert lines["sn"].get_ydata().tolist() == [24.0, 14.0]
    plt.close(fig)


def test_traces_draw_the_diagnostics_of_the_chosen_trials(tables, tmp_path):
    chosen = choose_trials(tables)
    trials = tables.trials.set_index("run_id")
    assert trials.loc[chosen[0], "divergence_step"] == 100  # the earliest divergence comes first
    diagnostics = tables.diagnostics
    with_diag = diagnostics.loc[diagnostics["quantity"] == "sigma", "run_id"].unique()[:1].tolist()
    fig = plot_traces(tables, with_diag)
    sigma = {line.get_label(): line for line in fig.axes[0].lines}
    expected = trace_data(tables, with_diag, ["sigma"])
    assert np.allclose(sigma["blocks.0"].get_ydata(), expected["value"])
    grad = {line.get_label() for line in fig.axes[1].lines}
    assert grad == {"total", "blocks.0"}  # D's layers and total; G is left out
    paths = save(fig, tmp_path, "traces")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in paths["svg"].read_bytes()[:500]


def test_theory_trends_draw_each_variants_layers_beside_the_prediction(tables):
    std = std_ratio_trends(tables).set_index(["variant", "layer", "iteration"])
    assert (std.loc["sn", "median"] == 1).all()  # held at its prediction throughout
    assert std.loc[("bsn", "blocks.0", 0), "median"] == 1
    assert std.loc[("bsn", "blocks.0", 1000), "median"] == 2
    assert std.loc[("bsn", "blocks.0", 1000), "n_trials"] == 5
    conv = conv_ratio_trends(tables)
    assert conv["variant"].unique().tolist() == ["sn"] and np.allclose(conv["median"], 1.5)
    assert conv["iteration"].tolist() == [500, 1000]
    assert np.allclose(gradient_trends(tables, "G")["median"], 0.2)
    fig = plot_layer_trends(std.reset_index(), ylabel="std / prediction", title="t", reference=1.0)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["bsn", "sn"]
    [drift] = [line for line in panels[0].lines if line.get_label() == "blocks.0"]
    assert np.allclose(drift.get_ydata(), std.loc[("bsn", "blocks.0"), "median"])
    assert [line.get_ydata()[0] for line in panels[1].lines if line.get_label().startswith("_")] == [1.0]
    plt.close(fig)
