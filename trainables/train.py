"""One GAN training run: `train(config, report, workdir=...)`.

Reads top to bottom: config, data, the evaluation, the trial (networks, normalization, optimisers, streams,
divergence watch), the step (this file's `SingleStep`), then the loop. One iteration is `n_dis`
discriminator steps and one generator step (`trial.train_iteration`). The loop itself never reads a tensor
on the host; logging steps do (`Trial.log`). Everything but the step is shared with the packed trial
(trainables/trial.py). The trial knows nothing of Ray or MLflow: `report(metrics, checkpoint_dir)` is its
only channel out (the README lists its keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainables.config import TrialConfig, parse_config
from trainables.diagnostics import gradient_norms
from trainables.events import parameter_norms
from trainables.losses import discriminator_loss, generator_loss, gradient_penalty
from trainables.normalization import advance_power_iterations
from trainables.trial import (
    DStep,
    GStep,
    Report,
    TrainingRate,
    Trial,
    build_evaluation,
    is_logging_step,
    logged_values,
    train_iteration,
    training_images,
)


class SingleStep:
    """One trial's D and G steps, eager or (`compile`) through torch.compile; the reference a pack is held to.

    The training forwards go through `train_g` / `train_d`; evaluation and diagnostics use the eager modules
    (the same parameters).
    """

    def __init__(self, trial: Trial, *, compile: bool = False):
        cfg = trial.config
        self.generator, self.discriminator = trial.generator, trial.discriminator
        self.opt_g, self.opt_d = trial.opt_g, trial.opt_d
        self.loss, self.gp_weight, self.noise = cfg.loss, cfg.gp_weight, trial.noise
        self.d_params = [p for p in self.discriminator.parameters() if p.requires_grad]
        self.g_params = [p for p in self.generator.parameters() if p.requires_grad]
        self.train_g, self.train_d = self.generator, self.discriminator
        if compile:
            self._compile(trial.device)

    def _compile(self, device: torch.device) -> None:
        mode = "reduce-overhead" if device.type == "cuda" else "default"  # CUDA graphs: no launch per kernel
        # fullgraph: a graph break would split the CUDA graphs and bring back a launch per kernel around it.
        # The reset: in a worker process reused for several trials, earlier trials' graphs would count
        # toward dynamo's recompile limit (8 per code object), beyond which fullgraph fails.
        torch.compiler.reset()
        compiled_g = torch.compile(self.generator, mode=mode, fullgraph=True)
        compiled_d = torch.compile(self.discriminator, mode=mode, fullgraph=True)

        # The outputs are copies: CUDA graphs reuse an output's memory once the next compiled call starts,
        # and the loop reads fake and D's output after later calls (the WGAN-GP penalty, logging steps).
        def train_g(z: Tensor) -> Tensor:
            return compiled_g(z).clone()

        def train_d(images: Tensor) -> Tensor:
            return compiled_d(images).clone()

        self.train_g, self.train_d = train_g, train_d

    def d_step(self, real: Tensor, z: Tensor, *, layer_norms: bool = False) -> DStep:
        batch = real.shape[0]
        with torch.no_grad():
            fake = self.train_g(z)
        # One D forward on real and fake together: one σ per D step, as the official code.
        logits = self.train_d(torch.cat([real, fake]))
        loss = discriminator_loss(self.loss, logits[:batch], logits[batch:])
        if self.loss == "wgan_gp":
            loss = loss + gradient_penalty(self.discriminator, real, fake, weight=self.gp_weight,
                                           generator=self.noise)
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        param_norms = parameter_norms([p.grad for p in self.d_params])
        grad_norm = torch.linalg.vector_norm(param_norms)  # as get_total_norm: the norm of the norms
        layers = gradient_norms(self.discriminator, "grad_norm/D") if layer_norms else None
        self.opt_d.step()
        advance_power_iterations(self.discriminator)  # the stored u, v take their steps on the new weights
        return DStep(loss.detach(), grad_norm, param_norms, logits.detach(), fake, layers)

    def g_step(self, z: Tensor, *, layer_norms: bool = False) -> GStep:
        # D's weights need no gradients, only the path through D to G; D's forward is its training forward,
        # a power iteration from the stored u that is not stored, as in the official code.
        for p in self.d_params:
            p.requires_grad_(False)
        loss = generator_loss(self.loss, self.train_d(self.train_g(z)))
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        for p in self.d_params:
            p.requires_grad_(True)
        param_norms = parameter_norms([p.grad for p in self.g_params])
        grad_norm = torch.linalg.vector_norm(param_norms)
        layers = gradient_norms(self.generator, "grad_norm/G") if layer_norms else None
        self.opt_g.step()
        return GStep(loss.detach(), grad_norm, param_norms, layers)


def train(config: TrialConfig | dict, report: Report, *, workdir: str | Path,
          resume_from: str | Path | None = None) -> dict[str, Any]:
    """Train one configuration; report metrics and checkpoints; return the final summary (also reported).

    workdir receives `samples/iter_XXXXXXX.png`, `events.json` and `checkpoint/state.pt`.
    resume_from: a checkpoint folder written by an earlier call with the same config.
    """
    cfg = parse_config(config)
    source = training_images(cfg)
    evaluation = build_evaluation(cfg, source)  # the weights, classifier and real statistics: fail early too
    workdir = Path(workdir)
    trial = Trial.build(cfg, report, source, evaluation, workdir=workdir,
                        checkpoint_dir=workdir / "checkpoint")
    if resume_from is not None and trial.resume(Path(resume_from)):
        return trial.summary  # it had already ended: its result is reported again, nothing is trained
    step = SingleStep(trial, compile=cfg.compile)
    workdir.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves nothing behind

    rate = TrainingRate(trial.iteration)
    for iteration in range(trial.iteration + 1, cfg.iterations + 1):
        logging_step = is_logging_step(cfg, iteration)
        real, d, g = train_iteration(step, trial.monitor, cfg, iteration, trial.sampler.next, trial.latents,
                                     layer_norms=logging_step)
        if not logging_step:
            continue

        values = {key: value.item() for key, value in logged_values(d, g).items()}
        if trial.log(iteration, values, real=real, fake=d.fake, layer_norms=d.layers | g.layers,
                     it_per_s=rate(iteration)):
            return trial.summary
        rate.restart(iteration)  # evaluation, checkpoint and report time are left out of the next window
    raise AssertionError("unreachable: the last iteration returns")  # pragma: no cover
