"""The study as a Tune search: grid space, seeds as replicates, Optuna told the mean over seeds."""

from __future__ import annotations

import random

import pytest

from study.spec import RandInt, load_spec
from study.tuning import (
    SeedReplicates,
    param_space,
    search_algorithm,
    trial_count,
    trial_resources,
    tune_domain,
)


def test_grid_space_is_every_point_times_a_seed_grid_axis():
    spec, _ = load_spec("default")
    space = param_space(spec)
    assert len(space["point"]["grid_search"]) == 18
    assert space["seed"] == {"grid_search": [0, 1]}
    assert {"lr": "1e-2", "beta1": 0.5, "variant": "bssn"} in space["point"]["grid_search"]
    assert trial_count(spec) == 36


def test_gpu_fraction_becomes_the_trial_resource_request():
    spec, _ = load_spec("default", ["resources.gpu=0.25", "resources.cpus=2"])
    assert trial_resources(spec) == {"cpu": 2.0, "gpu": 0.25}


def test_spec_randint_upper_bound_is_inclusive_in_tune():
    domain = tune_domain(RandInt(dist="randint", low=1, high=5))
    random.seed(0)
    values = {domain.sample() for _ in range(300)}
    assert values == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("objectives", [["objective"], ["objective", "diverged"]])
def test_optuna_learns_the_mean_over_seeds_of_each_objective(tmp_path, objectives):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\naxes:\n  g_lr: {dist: loguniform, low: 1.0e-5, high: 1.0e-2}\n"
                    "  variant: [sn, bsn]\n"
                    f"seeds: 2\nsearch: {{kind: optuna, objectives: {objectives}}}\nbudget: {{samples: 2}}\n")
    spec, _ = load_spec(str(path))
    searcher = search_algorithm(spec)
    assert isinstance(searcher, SeedReplicates)
    single = len(objectives) == 1
    searcher.set_search_properties("objective" if single else None, "min" if single else None,
                                   param_space(spec))
    suggestions = {trial: searcher.suggest(trial) for trial in ("a", "b", "c", "d")}
    # Two points, each for seed index 0 and 1: the repeat index picks the seed.
    assert [s["__trial_index__"] for s in suggestions.values()] == [0, 1, 0, 1]
    assert suggestions["a"]["point"] == suggestions["b"]["point"] != suggestions["c"]["point"]
    results = {"a": (10.0, 0), "b": (30.0, 1), "c": (5.0, 0), "d": (7.0, 0)}
    for trial, (objective, diverged) in results.items():
        searcher.on_trial_complete(trial, {"objective": objective, "diverged": diverged})
    told = [trial.values for trial in searcher.searcher._ot_study.trials]
    assert told == ([[20.0], [6.0]] if single else [[20.0, 0.5], [6.0, 0.0]])
