"""The shipped presets. Each bssn-paper-* preset expands to exactly the official runs of Lin, Sekar, Fanti
(arXiv:2009.02773), held against the official config files transcribed below, and runs them as the paper's
protocol does; the broader studies are named as such."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from pathlib import Path

import pytest

from study.spec import expand_grid, load_spec, preset_names, trial_config

README = Path(__file__).resolve().parents[1] / "README.md"

# The official configs, transcribed from fjxmlzn/BSN at commit 10862a2ce1a3efd045539d8b72c5353e888e4a92.
# no_gamma-CNN/config.py: global_config batch_size 64, latent_dim 128, metric_freq 10000 (lines 10-21); each
# test_config block (lines 23-158) is a product of its lists, as GPUTaskScheduler's ConfigManager expands it.
CNN_GLOBAL = {"batch_size": 64, "latent_dim": 128, "metric_freq": 10_000}
CIFAR10_SCALES = [0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.4, 2.6, 2.8, 3.0, 3.2, 3.4, 3.6, 3.8,
                  4.0]
SMALL_SCALES = [0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6]
LR_GRID = {"g_lr": [0.0001, 0.0002], "d_lr": [0.0001, 0.0002]}
ONE_LR = {"g_lr": [0.0001], "d_lr": [0.0001]}
BETA_999 = {"g_beta1": [0.5], "d_beta1": [0.5], "g_beta2": [0.999], "d_beta2": [0.999], "n_dis": [1]}
BETA_9 = {"g_beta1": [0.5], "d_beta1": [0.5], "g_beta2": [0.9], "d_beta2": [0.9], "n_dis": [5]}
MODES = {"sn_mode": ["SN", "BSN"]}
RUNS = {"run": range(5)}
CNN_TEST_CONFIG = [
    # lines 24-38, 39-53, 54-68: the scale sweep
    {"dataset": ["cifar10"], "iteration": [400000], **RUNS, **ONE_LR, **BETA_999, "mg": [4], **MODES,
     "scale": CIFAR10_SCALES},
    {"dataset": ["stl10"], "iteration": [800000], **RUNS, **ONE_LR, **BETA_999, "mg": [6], **MODES,
     "scale": SMALL_SCALES},
    {"dataset": ["celeba"], "iteration": [400000], **RUNS, **ONE_LR, **BETA_999, "mg": [8], **MODES,
     "scale": SMALL_SCALES},
    # lines 69-83, 84-98, 99-113: the lr grid
    {"dataset": ["cifar10"], "iteration": [400000], **RUNS, **LR_GRID, **BETA_999, "mg": [4], **MODES,
     "scale": [1.0]},
    {"dataset": ["stl10"], "iteration": [800000], **RUNS, **LR_GRID, **BETA_999, "mg": [6], **MODES,
     "scale": [1.0]},
    {"dataset": ["celeba"], "iteration": [400000], **RUNS, **LR_GRID, **BETA_999, "mg": [8], **MODES,
     "scale": [1.0]},
    # lines 114-128, 129-143, 144-158: n_dis 5 (STL-10 at 400k iterations)
    {"dataset": ["cifar10"], "iteration": [400000], **RUNS, **ONE_LR, **BETA_9, "mg": [4], **MODES,
     "scale": [1.0]},
    {"dataset": ["stl10"], "iteration": [400000], **RUNS, **ONE_LR, **BETA_9, "mg": [6], **MODES,
     "scale": [1.0]},
    {"dataset": ["celeba"], "iteration": [400000], **RUNS, **ONE_LR, **BETA_9, "mg": [8], **MODES,
     "scale": [1.0]},
]
# no_gamma-ResNet/config.py: global_config iteration 500000, latent_dim 128, metric_freq 10000 (lines 10-21),
# one test_config block (lines 24-38); gan_task.py builds the generator with mg 4 on ILSVRC2012 preprocessed
# to 128 px (dataset_preprocess/ImageNet/preprocess.py, target_size=128).
RESNET_GLOBAL = {"iteration": 500_000, "latent_dim": 128, "metric_freq": 10_000}
RESNET_TEST_CONFIG = [
    {"run": range(3), "g_lr": [0.0002], "d_lr": [0.0002], "g_beta1": [0.0], "d_beta1": [0.0],
     "g_beta2": [0.9], "d_beta2": [0.9], "n_dis": [5], "num_gpus": [1], "d_batch_size": [16],
     "g_batch_size": [32], "scale": [1.0, 1.2, 1.4, 1.6], "sn_mode": ["SN", "BSN"]},
]
# gan/metric.py (both code folders): FID of num_gen_images=10000 generated vs num_real_images=5000 real,
# IS of num_images=50000 generated in num_splits=10; gan.py evaluates them every metric_freq iterations.
OFFICIAL_PROTOCOL = {"eval_every": 10_000, "eval_generated": 10_000, "eval_real": 5_000,
                     "eval_generated_is": 50_000}
RESOLUTION = {"cifar10": 32, "stl10": 48, "celeba": 64}  # mg x 8 px: the generator's output size

FIELDS = ("dataset", "resolution", "architecture", "iterations", "g_lr", "d_lr", "beta1", "beta2", "n_dis",
          "variant", "scale", "seed", "d_batch_size", "g_batch_size", "z_dim")


def official_runs(test_config: list[dict], global_config: dict) -> list[dict]:
    """Every run the official scheduler starts: each block's product, once per distinct config (it skips a
    run whose work folder, named by the config, already exists)."""
    runs = []
    for block in test_config:
        for values in itertools.product(*block.values()):
            run = {**global_config, **dict(zip(block, values, strict=True))}
            if run not in runs:
                runs.append(run)
    return runs


def as_trial(run: dict, architecture: str, dataset: str | None = None, resolution: int | None = None
             ) -> tuple:
    """An official run in this project's terms: c = 1 is SN / BSN, c != 1 SSN / BSSN; `run` is the seed."""
    assert run["g_beta1"] == run["d_beta1"] and run["g_beta2"] == run["d_beta2"]  # one Adam setting here
    family = {"SN": "sn", "BSN": "bsn"}[run["sn_mode"]]
    dataset = dataset or run["dataset"]
    trial = {
        "dataset": dataset, "resolution": resolution or RESOLUTION[dataset], "architecture": architecture,
        "iterations": run["iteration"], "g_lr": run["g_lr"], "d_lr": run["d_lr"], "beta1": run["g_beta1"],
        "beta2": run["g_beta2"], "n_dis": run["n_dis"],
        "variant": family if run["scale"] == 1.0 else {"sn": "ssn", "bsn": "bssn"}[family],
        "scale": run["scale"], "seed": run["run"],
        "d_batch_size": run.get("d_batch_size", run.get("batch_size")),
        "g_batch_size": run.get("g_batch_size", run.get("batch_size")),
        "z_dim": run["latent_dim"],
    }
    return tuple(trial[field] for field in FIELDS)


def official_trials(preset: str) -> list[tuple]:
    if preset == "bssn-paper-imagenet":
        return [as_trial(run, "resnet", "imagefolder", 128) for run in official_runs(RESNET_TEST_CONFIG,
                                                                                     RESNET_GLOBAL)]
    dataset = preset.removeprefix("bssn-paper-")
    runs = official_runs(CNN_TEST_CONFIG, CNN_GLOBAL)
    return [as_trial(run, "standard_cnn") for run in runs if run["dataset"] == dataset]


def preset_configs(preset: str) -> list:
    spec, _ = load_spec(preset)
    return [trial_config(spec, point, seed) for point, seed in expand_grid(spec)]


PAPER_PRESETS = ["bssn-paper-cifar10", "bssn-paper-stl10", "bssn-paper-celeba", "bssn-paper-imagenet"]
# The official counts: distinct cells (runs / seeds) and runs.
OFFICIAL_COUNTS = {"bssn-paper-cifar10": (46, 230), "bssn-paper-stl10": (22, 110),
                   "bssn-paper-celeba": (22, 110), "bssn-paper-imagenet": (8, 24)}


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_preset_expands_to_exactly_the_official_runs(preset):
    ours = [tuple(getattr(config, field) for field in FIELDS) for config in preset_configs(preset)]
    official = official_trials(preset)
    assert len(set(ours)) == len(ours)  # no run twice
    assert Counter(ours) == Counter(official)  # nothing more, nothing less
    cells, runs = OFFICIAL_COUNTS[preset]
    assert (len({trial[:FIELDS.index("seed")] for trial in official}), len(official)) == (cells, runs)


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_preset_evaluates_as_the_paper_at_every_evaluation(preset):
    for config in preset_configs(preset):
        assert {field: getattr(config, field) for field in OFFICIAL_PROTOCOL} == OFFICIAL_PROTOCOL
        assert set(config.metric_names) >= {"fid", "is"} and config.primary_metric == "fid"
        assert config.width == 1.0  # the paper's networks, not the CPU studies' narrow ones


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_preset_records_divergences_and_stops_only_on_non_finite_values(preset):
    for config in preset_configs(preset):
        policy = config.divergence.policy
        assert {cause for cause, action in policy.items() if action == "stop"} == {"nonfinite_loss",
                                                                                 "nonfinite_grad"}
        assert {"fid_blowup", "d_saturation", "mode_collapse", "grad_explosion", "grad_vanishing"} <= {
            cause for cause, action in policy.items() if action == "record"}


def test_stl10_runs_800k_iterations_at_n_dis_1_and_400k_at_n_dis_5():
    iterations = {(config.n_dis, config.iterations) for config in preset_configs("bssn-paper-stl10")}
    assert iterations == {(1, 800_000), (5, 400_000)}


def test_celeba_preset_reads_every_aligned_face():
    assert {config.celeba_split for config in preset_configs("bssn-paper-celeba")} == {"all"}


def test_imagenet_preset_gives_d_and_g_their_own_batch_sizes():
    configs = preset_configs("bssn-paper-imagenet")
    assert {(config.d_batch_size, config.g_batch_size) for config in configs} == {(16, 32)}


@pytest.mark.parametrize("dataset", ["cifar10", "stl10", "celeba"])
def test_extended_preset_adds_variants_and_scales_to_the_paper_grid_and_stops_on_divergence(dataset):
    paper = {tuple(getattr(c, f) for f in FIELDS) for c in preset_configs(f"bssn-paper-{dataset}")}
    extended_configs = preset_configs(f"bssn-paper-{dataset}-extended")
    extended = [tuple(getattr(c, f) for f in FIELDS) for c in extended_configs]
    assert len(set(extended)) == len(extended) == 540
    assert {c.variant for c in extended_configs} == {
        "none", "sn", "bsn", "strict_sn", "sn_gamma_shared", "sn_gamma_layer", "weight_norm", "layer_norm",
        "batch_norm", "ssn", "bssn"}
    assert sorted({c.scale for c in extended_configs}) == CIFAR10_SCALES
    assert paper <= set(extended)  # every official run, and more
    assert all(c.divergence.policy["fid_blowup"] == "stop" for c in extended_configs)
    losses = {c.variant: c.loss for c in extended_configs}
    assert losses["sn_gamma_shared"] == losses["sn_gamma_layer"] == "wgan_gp" and losses["sn"] == "hinge"


def test_presets_shipped_are_the_paper_s_their_extensions_and_the_surveys():
    assert preset_names() == [
        "bssn-paper-celeba", "bssn-paper-celeba-extended", "bssn-paper-cifar10",
        "bssn-paper-cifar10-extended", "bssn-paper-imagenet", "bssn-paper-stl10", "bssn-paper-stl10-extended",
        "compare-gan-wide", "default", "miyato-AF",
    ]


def test_readme_presets_section_names_every_preset_and_its_divergence_policy():
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^### Presets\n(.*?)^#", text, flags=re.S | re.M)
    assert section, "README.md has no '### Presets' section"
    for name in preset_names():
        assert f"`{name}`" in section.group(1), name
    assert "record" in section.group(1) and "stop" in section.group(1)
