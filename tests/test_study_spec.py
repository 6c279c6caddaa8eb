"""Study specs: expansion, bundles, unions, and every bad input named by its field (the paper presets: in
tests/test_presets.py)."""

from __future__ import annotations

import pytest

from study.spec import (
    StudyError,
    expand_grid,
    grid_packs,
    load_spec,
    trial_config,
)


def write_spec(tmp_path, text: str):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return str(path)


def test_default_preset_is_3_lrs_by_2_beta1_by_none_sn_bssn_by_2_seeds_on_cpu_digits():
    spec, preset = load_spec("default")
    trials = expand_grid(spec)
    configs = [trial_config(spec, point, seed) for point, seed in trials]
    assert preset == "default" and len(trials) == 36
    assert {(c.g_lr, c.d_lr) for c in configs} == {(1e-4, 1e-4), (1e-3, 1e-3), (1e-2, 1e-2)}
    assert {c.beta1 for c in configs} == {0.0, 0.5}
    assert {c.variant for c in configs} == {"none", "sn", "bssn"}
    assert {c.seed for c in configs} == {0, 1}
    assert {(c.dataset, c.device) for c in configs} == {("digits", "cpu")}
    assert spec.axis_names == ["lr", "beta1", "variant", "seed"]


def test_miyato_setting_bundle_moves_lr_betas_and_n_dis_together():
    spec, _ = load_spec("miyato-AF")
    configs = {(point["setting"], point["variant"]): trial_config(spec, point, seed)
               for point, seed in expand_grid(spec)}
    assert len(expand_grid(spec)) == 6 * 6 * 5
    d = configs[("D", "bssn")]
    assert (d.g_lr, d.d_lr, d.beta1, d.beta2, d.n_dis, d.dataset) == (1e-3, 1e-3, 0.5, 0.9, 5, "cifar10")
    f = configs[("F", "strict_sn")]
    assert (f.beta1, f.beta2, f.n_dis) == (0.9, 0.999, 5)


def test_compare_gan_wide_is_a_random_search_of_100_points_by_3_seeds():
    spec, _ = load_spec("compare-gan-wide")
    assert spec.search.kind == "random" and spec.budget.samples == 100 and spec.seeds == [0, 1, 2]
    assert spec.axes["g_lr"].low == 1e-5 and spec.axes["g_lr"].high == 1e-2
    assert (spec.axes["n_dis"].low, spec.axes["n_dis"].high) == (1, 5)


def test_a_union_of_grids_runs_a_shared_cell_once(tmp_path):
    path = write_spec(tmp_path, "name: u\ngrids:\n  - {variant: [sn, bsn]}\n  - {variant: [bsn, bssn]}\n"
                                "seeds: 2\n")
    spec, _ = load_spec(path)
    assert [(p["variant"], s) for p, s in expand_grid(spec)] == [
        ("sn", 0), ("sn", 1), ("bsn", 0), ("bsn", 1), ("bssn", 0), ("bssn", 1)]


def test_set_overrides_nested_fields_and_seed_count_means_a_range():
    spec, _ = load_spec("default", ["base.iterations=50", "seeds=3", "axes.variant=[sn]"])
    assert spec.base["iterations"] == 50 and spec.seeds == [0, 1, 2]
    assert len(expand_grid(spec)) == 3 * 2 * 1 * 3


@pytest.mark.parametrize(("overrides", "named"), [
    (["bogus=1"], "bogus: unknown field"),
    (["resources.bogus=1"], "resources.bogus: unknown field"),
    (["max_concurrent=many"], "max_concurrent: Input should be a valid integer"),
    (["axes.variant=[]"], "axes.variant: an axis needs at least one value"),
    (["resources.gpu=0"], "resources.gpu: Input should be greater than 0"),
    (["resources.gpu=1.5"], "resources.gpu: Input should be less than or equal to 1"),
    (["axes.widht=[0.5]"], "axes.widht: unknown trial-config field"),
    (["axes.seed=[1, 2]"], "axes.seed: seeds are not an axis"),
    (["base.n_dis=0"], "base.n_dis: n_dis must be >= 1"),
    (["axes.variant=[sn, spectral]"], "variant: Input should be 'none', 'sn'"),
    (["axes.g_lr={dist: loguniform, low: 1e-5, high: 1e-2}"], "axes.g_lr: a distribution needs search.kind"),
    (["base.checkpoint_every=150"], "base.checkpoint_every: 150 must be a multiple of eval_every (100)"),
    (["search.kind=random"], "budget: a random search needs budget.samples or budget.time_s"),
    (["axes.beta1=3"], "axes.beta1: an axis is a list of values, {dist: loguniform|uniform|randint|choice"),
    (["axes.variant=[sn, spectral]"], "(trial beta1=0.0,lr=1e-4,variant=spectral and 11 more)"),
    (["seeds=[1, 1]"], "seeds: seeds must be distinct, got [1, 1]"),
    (["pack_size=0"], "pack_size: Input should be greater than or equal to 1"),
    (["pack_size=4", "search.kind=random", "budget.samples=4"],
     "pack_size: packs are formed from a grid's cells; a random search suggests one trial at a time"),
    (["pack_size=4", "scheduler={grace_period: 10}"], "pack_size: ASHA stops whole Ray trials"),
    (["pack_size=4", "base.compile=true"], "pack_size: a pack runs uncompiled"),
])
def test_bad_spec_is_refused_naming_the_field(overrides, named):
    with pytest.raises(StudyError) as error:
        load_spec("default", overrides)
    assert named in str(error.value)
    assert str(error.value).startswith("invalid study 'default': ")


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(StudyError, match=r"--study 'nope': unknown preset .* presets: bssn-paper-celeba, "):
        load_spec("nope")


def test_cmaes_refuses_two_objectives_and_categorical_axes(tmp_path):
    path = write_spec(tmp_path, "name: c\naxes:\n  g_lr: {dist: loguniform, low: 1.0e-5, high: 1.0e-2}\n"
                                "  variant: [sn, bsn]\nsearch: {kind: optuna, sampler: cmaes, "
                                "objectives: [objective, diverged]}\nbudget: {samples: 4}\n")
    with pytest.raises(StudyError) as error:
        load_spec(path)
    assert "search.sampler: cmaes optimises a single objective" in str(error.value)
    assert "search.sampler: cmaes samples numbers only" in str(error.value)


def test_search_distribution_bounds_are_checked_against_the_trial_config(tmp_path):
    path = write_spec(tmp_path, "name: s\naxes:\n  beta1: {dist: uniform, low: 0.0, high: 1.0}\n"
                                "search: {kind: random}\nbudget: {samples: 4}\n")
    with pytest.raises(StudyError, match=r"beta1: Adam beta must lie in \[0, 1\), got 1.0 \(trial beta1=1.0"):
        load_spec(path)


def test_grid_packs_group_trials_that_differ_only_in_member_fields():
    # default: lr {1e-4, 1e-3, 1e-2} x beta1 {0, 0.5} x variant {none, sn, bssn} x 2 seeds = 36 trials.
    spec, _ = load_spec("default", ["pack_size=5"])
    packs = grid_packs(spec)
    configs = [[trial_config(spec, point, seed) for point, seed in pack] for pack in packs]
    assert [len(pack) for pack in packs] == [5, 5, 2] * 3  # 12 trials per variant: 5 + 5 + 2
    for pack in configs:  # one variant per pack; lrs, betas and seeds vary within it
        assert len({config.variant for config in pack}) == 1
        shared = {config.model_dump_json(exclude={"g_lr", "d_lr", "beta1", "beta2", "scale", "seed",
                                                  "divergence"}) for config in pack}
        assert len(shared) == 1
    assert sorted((point["variant"], point["lr"], point["beta1"], seed) for pack in packs
                  for point, seed in pack) == sorted((point["variant"], point["lr"], point["beta1"], seed)
                                                     for point, seed in expand_grid(spec))
    assert grid_packs(load_spec("default")[0]) == [[trial] for trial in expand_grid(spec)]  # pack_size 1


def test_grid_packs_leave_unpackable_losses_and_differing_widths_apart(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nbase: {dataset: digits, device: cpu}\n"
                    "axes:\n  loss: [hinge, wgan_gp]\n  width: [0.25, 0.5]\n  g_lr: [1.0e-4, 2.0e-4]\n"
                    "seeds: 1\npack_size: 8\n")
    spec, _ = load_spec(str(path))
    packs = [[(point["loss"], point["width"], point["g_lr"]) for point, _ in pack]
             for pack in grid_packs(spec)]
    assert packs == [[("hinge", 0.25, 1e-4), ("hinge", 0.25, 2e-4)],
                     [("hinge", 0.5, 1e-4), ("hinge", 0.5, 2e-4)],
                     [("wgan_gp", 0.25, 1e-4)], [("wgan_gp", 0.25, 2e-4)],
                     [("wgan_gp", 0.5, 1e-4)], [("wgan_gp", 0.5, 2e-4)]]
