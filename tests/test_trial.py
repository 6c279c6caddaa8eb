"""The shared trial state and step interface (trainables/trial.py): an iteration's batches, on CPU."""

from __future__ import annotations

import pytest
import torch

from trainables.config import parse_config
from trainables.events import StepMonitor
from trainables.packing import PackedStep
from trainables.train import SingleStep
from trainables.trial import Trial, build_evaluation, train_iteration, training_images

SMALL = {"width": 0.0625, "z_dim": 8, "batch_size": 4, "d_batch_size": 6, "g_batch_size": 10, "n_dis": 2,
         "device": "cpu"}


def batch_sizes_seen(module: torch.nn.Module) -> list[int]:
    """The first dimension of every input `module` is called with, in order."""
    seen: list[int] = []
    module.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].shape[0]))
    return seen


def build(config: dict, tmp_path) -> Trial:
    cfg = parse_config(config | {"cache_dir": str(tmp_path / "cache")})
    source = training_images(cfg)
    return Trial.build(cfg, lambda metrics, checkpoint_dir=None: None, source, build_evaluation(cfg, source),
                       workdir=tmp_path, checkpoint_dir=tmp_path)


def test_single_iteration_runs_d_steps_at_d_batch_size_and_the_g_step_at_g_batch_size(tmp_path):
    trial = build(SMALL, tmp_path)
    generator_batches = batch_sizes_seen(trial.generator)
    discriminator_batches = batch_sizes_seen(trial.discriminator)
    real, d, g = train_iteration(SingleStep(trial), trial.monitor, trial.config, 1, trial.sampler.next,
                                 trial.latents)
    # two D steps (G's fakes, then D on real and fake together), then the G step (G, then D on its output)
    assert generator_batches == [6, 6, 10]
    assert discriminator_batches == [12, 12, 10]
    assert real.shape[0] == 6 and d.fake.shape[0] == 6 and d.logits.shape == (12,)


@pytest.mark.parametrize("d_batch_size, g_batch_size", [(6, 10), (10, 6)])
def test_packed_iteration_runs_each_members_steps_at_their_batch_sizes(tmp_path, d_batch_size, g_batch_size):
    config = SMALL | {"d_batch_size": d_batch_size, "g_batch_size": g_batch_size}
    trials = [build(config | {"seed": seed}, tmp_path / str(seed)) for seed in (0, 1)]
    step = PackedStep(trials)
    generator_batches = batch_sizes_seen(step.generator.template)  # inside vmap: one member's shapes
    discriminator_batches = batch_sizes_seen(step.discriminator.template)
    monitor = StepMonitor.stack([trial.monitor for trial in trials])
    real, d, g = train_iteration(step, monitor, trials[0].config, 1, step.real, step.latents)
    assert generator_batches == [d_batch_size, d_batch_size, g_batch_size]
    assert discriminator_batches == [2 * d_batch_size, 2 * d_batch_size, g_batch_size]
    assert real.shape[:2] == (2, d_batch_size) and d.logits.shape == (2, 2 * d_batch_size)
    assert g.loss.shape == (2,)


def test_evaluator_draws_is_on_its_own_count(tmp_path):
    cfg = parse_config(SMALL | {"eval_generated": 40, "eval_generated_is": 100, "eval_real": 50,
                                "cache_dir": str(tmp_path / "cache")})
    evaluator = build_evaluation(cfg, training_images(cfg)).metrics
    assert (evaluator.n_generated, evaluator.n_generated_is, evaluator.n_real) == (40, 100, 50)
