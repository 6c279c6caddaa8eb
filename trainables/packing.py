"""Trial packing: K compatible trials trained in one process as one batched computation.

`train_pack(configs, reports, workdir=...)` trains K configurations that differ only in `g_lr`, `d_lr`,
`beta1`, `beta2`, `scale`, `seed` (and their divergence thresholds) as one computation: each network's K
copies live as one stacked parameter tensor (K, N) (`torch.func.stack_module_state`, then flattened so that
the optimiser and the gradient norms are one kernel each), and every forward is
`torch.func.vmap(torch.func.functional_call)` over the members, which turns each convolution into one grouped
convolution. Buffers (G's batch-norm statistics, D's power-iteration vectors u, v) are stacked per member and
updated in place through vmap. `PackedAdam` is torch.optim.Adam's update with each member's own lr and betas.

Each member is still its own trial: the same initialisation, data stream and latents as `train(config_k)`
(the same seeding, one `BatchSampler` and one noise generator per member), the same `report(metrics,
checkpoint_dir)` contract with the same keys (train.py), its own divergence watch and events, samples and
events under `workdir/member_<k>/`, and its own checkpoint `workdir/checkpoint/member_<k>/state.pt` in
train.py's format, which `train(config_k, resume_from=...)` can also resume alone. A member that stops
(a divergence cause whose policy is `stop`) reports `done` with its cause and step and leaves the pack: the
stacks keep only the active members, so the others go on unchanged and a stopped member costs nothing more.

Every variant packs; the WGAN-GP loss does not (its gradient penalty differentiates D's input gradient,
which needs torch.func.grad inside vmap), and so neither do the learned-gamma SN variants with their default
loss (they pack with `loss: hinge`). Train those with `train()`.

`it_per_s` in each member's report is the pack's iteration rate (every member advances at it);
`pack_report`, if given, receives the pack's own rate summed over its active members.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from trainables.config import (
    GAMMA_VARIANTS,
    PACK_MEMBER_FIELDS,
    PACKED_LOSSES,
    SCALED_VARIANTS,
    ConfigError,
    TrialConfig,
    parse_config,
)
from trainables.data import BatchSampler, load_images, real_images
from trainables.diagnostics import (
    gradient_norms,
    input_gradient_norms,
    sample_diversity,
    save_sample_grid,
    spectral_metrics,
)
from trainables.events import DivergenceWatch, StepMonitor
from trainables.losses import discriminator_loss, generator_loss
from trainables.metrics import Evaluator
from trainables.networks import build_discriminator, build_generator
from trainables.normalization import SpectralNormalization, frozen_parametrizations, normalize
from trainables.train import (
    CHECKPOINT_FILE,
    GRID_SAMPLES,
    Report,
    finite_only,
    load_checkpoint,
    resolve_device,
)

ADAM_EPS = 1e-8  # torch.optim.Adam's default, as train.py uses it
PACK_CHECKPOINT = "checkpoint"  # folder under workdir: member_<k>/state.pt for every member


def member_name(k: int) -> str:
    return f"member_{k}"


def check_pack(configs: list[TrialConfig | dict]) -> list[TrialConfig]:
    """Validate each config, then that they can share one computation; ConfigError naming the field.

    Members may differ only in PACK_MEMBER_FIELDS; the loss must be one of PACKED_LOSSES.
    """
    if not isinstance(configs, list | tuple) or not configs:
        raise ConfigError("configs: a pack needs a non-empty list of trial configs")
    parsed = []
    for k, config in enumerate(configs):
        try:
            parsed.append(parse_config(config))
        except ConfigError as exc:
            raise ConfigError(f"configs[{k}]: {exc}") from None
    first = parsed[0]
    if first.loss not in PACKED_LOSSES:
        implied = " (the learned-gamma variants' default)" if first.variant in GAMMA_VARIANTS else ""
        raise ConfigError(
            f"configs[0].loss: {first.loss!r}{implied} cannot be packed: WGAN-GP's penalty needs D's input "
            f"gradient inside vmap; packing supports the losses {', '.join(PACKED_LOSSES)}, or train these "
            "one by one with train()")
    if first.compile:
        raise ConfigError("configs[0].compile: a pack runs uncompiled (its vmap over members is what batches "
                          "the small kernels); set compile: false, or train the trial alone with train()")
    shared = first.model_dump(exclude=set(PACK_MEMBER_FIELDS))
    for k, config in enumerate(parsed[1:], start=1):
        other = config.model_dump(exclude=set(PACK_MEMBER_FIELDS))
        for name, value in shared.items():
            if other[name] != value:
                raise ConfigError(
                    f"configs[{k}].{name}: {other[name]!r} differs from configs[0].{name} = {value!r}; the "
                    f"members of a pack may differ only in {', '.join(PACK_MEMBER_FIELDS)}")
    return parsed


class PackedAdam:
    """torch.optim.Adam (defaults: eps 1e-8, no weight decay, no amsgrad) on stacked parameters (K, N).

    Row k is member k's parameters, updated with its own lr, beta1, beta2 and step count, as
    torch.optim.Adam's single-tensor update would update that member alone: the same operations in the same
    order, bias corrections in float64 (Python floats there), rounded to the parameters' dtype as torch's
    kernels round their scalars.
    """

    def __init__(self, shape: tuple[int, int], *, lr: list[float], beta1: list[float], beta2: list[float],
                 device: torch.device, dtype: torch.dtype = torch.float32):
        k = shape[0]
        if not len(lr) == len(beta1) == len(beta2) == k:
            raise ValueError(f"lr, beta1, beta2: need one value per member ({k}), got {len(lr)}, "
                             f"{len(beta1)}, {len(beta2)}")
        as64 = partial(torch.tensor, dtype=torch.float64, device=device)
        self.lr, self.beta1, self.beta2 = as64(lr), as64(beta1), as64(beta2)
        self.steps = torch.zeros(k, dtype=torch.float64, device=device)
        self.exp_avg = torch.zeros(shape, device=device, dtype=dtype)
        self.exp_avg_sq = torch.zeros(shape, device=device, dtype=dtype)

    @torch.no_grad()
    def step(self, params: Tensor, grad: Tensor) -> None:
        """One Adam step of every row of params (K, N) with its gradient (K, N), in place."""
        self.steps += 1
        column = partial(torch.Tensor.unsqueeze, dim=1)
        one_minus_beta1 = column(1 - self.beta1).to(params.dtype)
        beta2, one_minus_beta2 = column(self.beta2).to(params.dtype), column(1 - self.beta2).to(params.dtype)
        neg_step_size = column(-self.lr / (1 - self.beta1 ** self.steps)).to(params.dtype)
        bias_correction2_sqrt = column((1 - self.beta2 ** self.steps).sqrt()).to(params.dtype)
        self.exp_avg.lerp_(grad, one_minus_beta1)
        self.exp_avg_sq.mul_(beta2).add_(grad.mul(one_minus_beta2).mul_(grad))  # addcmul's (value*a)*b
        denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
        params.add_(self.exp_avg.mul(neg_step_size).div_(denom))  # addcdiv's (value*a)/b

    def keep(self, rows: Tensor) -> None:
        """Keep only these members (row indices), in this order."""
        for name in ("lr", "beta1", "beta2", "steps", "exp_avg", "exp_avg_sq"):
            setattr(self, name, getattr(self, name)[rows])


class StackedNetwork:
    """K copies of one architecture, each with its own weights and buffers, called as one vmapped module.

    Parameters: one leaf `flat` (K, N), each named parameter a view (K, *shape) of it, in the order of the
    template's named_parameters(). Buffers: stacked (K, *shape), updated in place by the vmapped forwards.
    """

    def __init__(self, modules: list[nn.Module], optimizers: list[torch.optim.Adam], *, lr: list[float],
                 beta1: list[float], beta2: list[float], scales: list[float] | None, device: torch.device):
        params, self.buffers = stack_module_state(modules)
        self.template = modules[0]  # structure only: every call passes all parameters and buffers
        self.names = list(params)
        self.shapes = [p.shape[1:] for p in params.values()]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        rows = len(modules)
        self.flat = torch.cat([p.detach().reshape(rows, -1) for p in params.values()], dim=1).requires_grad_()
        self.adam = PackedAdam(tuple(self.flat.shape), lr=lr, beta1=beta1, beta2=beta2, device=device,
                               dtype=self.flat.dtype)
        for row, (module, optimizer) in enumerate(zip(modules, optimizers, strict=True)):
            self.load_adam_state(row, module, optimizer)
        self.scales = None if scales is None else torch.tensor(scales, device=device)
        self.spectral = [m for m in self.template.modules() if isinstance(m, SpectralNormalization)]

    def parameters(self, *, detach: bool = False) -> dict[str, Tensor]:
        flat = self.flat.detach() if detach else self.flat
        chunks = flat.split(self.sizes, dim=1)
        return {name: chunk.view(-1, *shape) for name, chunk, shape in zip(self.names, chunks, self.shapes,
                                                                          strict=True)}

    def __call__(self, inputs: Tensor, *, detach_parameters: bool = False) -> Tensor:
        """Each member's forward on its own inputs: (K, B, ...) -> (K, B, ...)."""
        params = self.parameters(detach=detach_parameters)
        in_dims = (0, 0, 0, None if self.scales is None else 0)
        return vmap(self._member_forward, in_dims=in_dims)(params, self.buffers, inputs, self.scales)

    def _member_forward(self, params: dict, buffers: dict, inputs: Tensor, scale: Tensor | None) -> Tensor:
        with self._scaled(scale):
            return functional_call(self.template, (params, buffers), (inputs,))

    @contextmanager
    def _scaled(self, scale: Tensor | None) -> Iterator[None]:
        """The member's constant c in every SN layer: a plain attribute, which functional_call can't swap."""
        if scale is None:
            yield
            return
        saved = [module.scale for module in self.spectral]
        for module in self.spectral:
            module.scale = scale
        try:
            yield
        finally:
            for module, value in zip(self.spectral, saved, strict=True):
                module.scale = value

    def row_norms(self, grad: Tensor) -> Tensor:
        """Each member's total gradient norm (K,): torch.nn.utils.get_total_norm over its parameters."""
        return torch.linalg.vector_norm(grad, dim=1)

    def keep(self, rows: Tensor) -> None:
        """Keep only these members (row indices), in this order."""
        self.flat = self.flat.detach()[rows].requires_grad_()
        self.buffers = {name: buffer[rows] for name, buffer in self.buffers.items()}
        self.adam.keep(rows)
        if self.scales is not None:
            self.scales = self.scales[rows]

    @torch.no_grad()
    def copy_to(self, row: int, module: nn.Module) -> None:
        """Write member `row`'s parameters and buffers into its own module (diagnostics, checkpoints)."""
        params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
        for name, value in self.parameters(detach=True).items():
            params[name].copy_(value[row])
        for name, value in self.buffers.items():
            buffers[name].copy_(value[row])

    def gradients_to(self, row: int, module: nn.Module, grad: Tensor) -> None:
        """Member `row`'s rows of grad (K, N) as the .grad of its module's parameters (views, no copy)."""
        params = dict(module.named_parameters())
        for name, chunk, shape in zip(self.names, grad[row].split(self.sizes), self.shapes, strict=True):
            params[name].grad = chunk.view(shape)

    def save_adam_state(self, row: int, module: nn.Module, optimizer: torch.optim.Adam) -> None:
        """Member `row`'s Adam moments and step into its torch.optim.Adam (train.py's checkpoint format)."""
        step = float(self.adam.steps[row])
        if step == 0:
            return
        params = dict(module.named_parameters())
        moments = zip(self.adam.exp_avg[row].split(self.sizes), self.adam.exp_avg_sq[row].split(self.sizes),
                      strict=True)
        for name, shape, (exp_avg, exp_avg_sq) in zip(self.names, self.shapes, moments, strict=True):
            optimizer.state[params[name]] = {"step": torch.tensor(step),
                                             "exp_avg": exp_avg.view(shape).clone(),
                                             "exp_avg_sq": exp_avg_sq.view(shape).clone()}

    @torch.no_grad()
    def load_adam_state(self, row: int, module: nn.Module, optimizer: torch.optim.Adam) -> None:
        params = dict(module.named_parameters())
        states = [optimizer.state.get(params[name]) for name in self.names]
        if all(state is None for state in states):
            return  # a fresh optimiser: zero moments, step 0
        self.adam.steps[row] = float(states[0]["step"])
        self.adam.exp_avg[row] = torch.cat([state["exp_avg"].flatten() for state in states])
        self.adam.exp_avg_sq[row] = torch.cat([state["exp_avg_sq"].flatten() for state in states])


class PackedStepMonitor:
    """trainables.events.StepMonitor for K members at once: (K, 3) tensors on the device, no host sync.

    `member(row)` gives that member's StepMonitor (the same state), which DivergenceWatch reads and which goes
    into the member's checkpoint.
    """

    def __init__(self, monitors: list[StepMonitor], device: torch.device):
        self.updates = monitors[0].updates  # every member of a pack has had the same updates
        self.explosion_threshold = torch.tensor([m.explosion_threshold for m in monitors], device=device)
        self.first_iteration = torch.stack([m.first_iteration for m in monitors])
        self.first_order = torch.stack([m.first_order for m in monitors])
        self.first_value = torch.stack([m.first_value for m in monitors])
        self.order_within_update = monitors[0].order_within_update

    # StepMonitor's rule on (K,) losses and gradient norms: its tensors broadcast over the member dim.
    update = StepMonitor.update

    def member(self, row: int) -> StepMonitor:
        monitor = StepMonitor(float(self.explosion_threshold[row]), self.first_iteration.device)
        monitor.load_state_dict({"updates": self.updates, "first_iteration": self.first_iteration[row],
                                 "first_order": self.first_order[row], "first_value": self.first_value[row]})
        return monitor

    def keep(self, rows: Tensor) -> None:
        for name in ("explosion_threshold", "first_iteration", "first_order", "first_value"):
            setattr(self, name, getattr(self, name)[rows])


class PackedGAN:
    """The packed training step: K generators and discriminators, each member's step as train.py's loop.

    real: (K, B, 3, R, R) in [-1, 1]; z: (K, B, z_dim). Members are rows, in the order they were given.
    """

    def __init__(self, generators: list[nn.Module], discriminators: list[nn.Module],
                 configs: list[TrialConfig], device: torch.device, *,
                 optimizers: list[tuple[torch.optim.Adam, torch.optim.Adam]] | None = None):
        if optimizers is None:
            optimizers = [single_trial_optimizers(g, d, cfg)
                          for g, d, cfg in zip(generators, discriminators, configs, strict=True)]
        scaled = configs[0].variant in SCALED_VARIANTS
        self.loss = configs[0].loss
        self.generator = StackedNetwork(
            generators, [opt_g for opt_g, _ in optimizers], lr=[c.g_lr for c in configs],
            beta1=[c.beta1 for c in configs], beta2=[c.beta2 for c in configs], scales=None, device=device)
        self.discriminator = StackedNetwork(
            discriminators, [opt_d for _, opt_d in optimizers], lr=[c.d_lr for c in configs],
            beta1=[c.beta1 for c in configs], beta2=[c.beta2 for c in configs],
            scales=[c.scale for c in configs] if scaled else None, device=device)

    def d_step(self, real: Tensor, z: Tensor, *, before_update=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One D step of every member: returns loss_d (K,), grad_norm_d (K,), D's logits (K, 2B), fake.

        before_update(grad (K, N)): called with D's gradients before Adam steps (logging steps).
        """
        d = self.discriminator
        with torch.no_grad():
            fake = self.generator(z)  # G in training mode: its batch-norm statistics move, as in train.py
        d_out = d(torch.cat([real, fake], dim=1))  # one D forward on real and fake: one power iteration
        batch = real.shape[1]
        loss_d = vmap(partial(discriminator_loss, self.loss))(d_out[:, :batch], d_out[:, batch:])
        (grad,) = torch.autograd.grad(loss_d.sum(), d.flat)  # members are independent: row k is k's gradient
        grad_norm = d.row_norms(grad)
        if before_update is not None:
            before_update(grad)
        d.adam.step(d.flat, grad)
        return loss_d.detach(), grad_norm, d_out.detach(), fake

    def g_step(self, z: Tensor, *, before_update=None) -> tuple[Tensor, Tensor]:
        """One G step of every member through its frozen D: returns loss_g (K,) and grad_norm_g (K,)."""
        g, d = self.generator, self.discriminator
        with frozen_parametrizations(d.template):  # as train.py: this D forward advances no power iteration
            logits = d(g(z), detach_parameters=True)
        loss_g = vmap(partial(generator_loss, self.loss))(logits)
        (grad,) = torch.autograd.grad(loss_g.sum(), g.flat)
        grad_norm = g.row_norms(grad)
        if before_update is not None:
            before_update(grad)
        g.adam.step(g.flat, grad)
        return loss_g.detach(), grad_norm

    def keep(self, rows: Tensor) -> None:
        self.generator.keep(rows)
        self.discriminator.keep(rows)


def single_trial_optimizers(generator: nn.Module, discriminator: nn.Module,
                            cfg: TrialConfig) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """train.py's (opt_g, opt_d): here they carry state in and out of checkpoints in train.py's format."""
    betas = (cfg.beta1, cfg.beta2)
    return (torch.optim.Adam(generator.parameters(), lr=cfg.g_lr, betas=betas),
            torch.optim.Adam(discriminator.parameters(), lr=cfg.d_lr, betas=betas))


def build_member_networks(cfg: TrialConfig, device: torch.device) -> tuple[nn.Module, nn.Module, Tensor]:
    """G and normalized D exactly as train(cfg) builds them (same seed, same draws), and the global RNG
    state after them (what train() saves as `torch_rng`: nothing in the loop draws from it)."""
    torch.manual_seed(cfg.seed)
    generator = build_generator(cfg.architecture, cfg.resolution, z_dim=cfg.z_dim, width=cfg.width).to(device)
    discriminator = build_discriminator(cfg.architecture, cfg.resolution, width=cfg.width).to(device)
    normalize(discriminator, cfg.variant, scale=cfg.scale, n_power_iterations=cfg.n_power_iterations,
              grad_through_power_iteration=cfg.sn_grad_through_power_iteration,
              example_input=torch.zeros(1, 3, cfg.resolution, cfg.resolution, device=device))
    return generator, discriminator, torch.get_rng_state()


@dataclass
class Member:
    """One trial of the pack: everything train.py keeps for it besides the stacked tensors."""

    index: int  # position in the configs given to train_pack
    config: TrialConfig
    report: Report
    workdir: Path
    generator: nn.Module  # its own modules: written from the stacks at logging steps, for diagnostics
    discriminator: nn.Module
    opt_g: torch.optim.Adam
    opt_d: torch.optim.Adam
    sampler: BatchSampler
    noise: torch.Generator
    torch_rng: Tensor
    watch: DivergenceWatch
    monitor: StepMonitor
    grid_latents: Tensor
    objective: float | None = None
    iteration: int = 0
    summary: dict[str, Any] | None = None  # set once the member is done
    logged: dict[str, Any] = field(default_factory=dict)  # this logging step's metrics so far

    @property
    def checkpoint_dir(self) -> Path:
        return self.workdir.parent / PACK_CHECKPOINT / member_name(self.index)

    def save_checkpoint(self, iteration: int, summary: dict | None = None) -> str:
        """train.py's checkpoint of this member (its modules and optimisers must be current)."""
        cfg = self.config
        state = {
            "iteration": iteration, "objective": self.objective, "config": cfg.model_dump_json(),
            "generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "sampler": self.sampler.state_dict(), "noise": self.noise.get_state(),
            "torch_rng": self.torch_rng,
            "monitor": self.monitor.state_dict(), "watch": self.watch.state_dict(),
        }
        if summary is not None:
            state["summary"] = json.dumps(summary)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        partial_path = self.checkpoint_dir / (CHECKPOINT_FILE + ".partial")
        torch.save(state, partial_path)
        os.replace(partial_path, self.checkpoint_dir / CHECKPOINT_FILE)  # atomic, as train.py
        return str(self.checkpoint_dir)

    def load_checkpoint(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sampler.load_state_dict(state["sampler"])
        self.noise.set_state(state["noise"].cpu())
        self.torch_rng = state["torch_rng"].cpu()
        self.monitor.load_state_dict(state["monitor"])
        self.watch.load_state_dict(state["watch"])
        self.iteration, self.objective = state["iteration"], state["objective"]

    def write_events(self) -> None:
        partial_path = self.workdir / "events.json.partial"
        partial_path.write_text(json.dumps([event.to_json() for event in self.watch.events], indent=2))
        partial_path.replace(self.workdir / "events.json")

    def evaluate(self, iteration: int, evaluator: Evaluator, device: torch.device) -> dict[str, float]:
        """train.py's evaluation of this member: metrics, sample grid, sigma_conv, the evaluation checks.

        train.py keeps its evaluation inside train(); this follows it line by line."""
        cfg, generator = self.config, self.generator
        generator.eval()
        eval_noise = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + iteration)

        @torch.no_grad()
        def generate(batch: int) -> Tensor:
            z = torch.randn(batch, cfg.z_dim, generator=eval_noise, device=device)
            return ((generator(z) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

        with torch.no_grad():
            grid = generator(self.grid_latents)
        metrics = evaluator(generate)
        generator.train()
        save_sample_grid(grid, self.workdir / "samples" / f"iter_{iteration:07d}.png")
        metrics.update(spectral_metrics(self.discriminator, conv_operator=True))
        self.watch.check_evaluation(iteration, cfg.primary_metric, metrics[cfg.primary_metric],
                                    sample_diversity(grid))
        return metrics


def train_pack(configs: list[TrialConfig | dict], reports: list[Report], *, workdir: str | Path,
               resume_from: str | Path | None = None,
               pack_report: Report | None = None) -> list[dict[str, Any]]:
    """Train K compatible configurations as one batched computation; return each member's summary, in order.

    configs: K trial configs that differ only in PACK_MEMBER_FIELDS (ConfigError naming the field otherwise).
    reports: K callables `report(metrics, checkpoint_dir)`, member k's channel out, with train.py's contract
        and keys; checkpoint_dir is `workdir/checkpoint/member_<k>`, a train.py checkpoint folder.
    workdir: receives `member_<k>/samples/`, `member_<k>/events.json` and the pack checkpoint `checkpoint/`.
    resume_from: a pack checkpoint folder (`workdir/checkpoint` of an earlier call with the same configs);
        finished members report their result again and train nothing, as train() does.
    pack_report: called after the members' reports at every logging step with {"iteration", "it_per_s"
        (summed over the active members), "active_members", "pack_size"} and the pack checkpoint folder
        whenever a member checkpoint was written at that step (else None): what a scheduler checkpoints.
    """
    cfgs = check_pack(list(configs))
    if len(reports) != len(cfgs):
        raise ValueError(f"reports: need one report callable per config ({len(cfgs)}), got {len(reports)}")
    cfg0 = cfgs[0]
    workdir = Path(workdir)
    device = resolve_device(cfg0.device)

    source = load_images(cfg0.dataset, cfg0.data_root, cfg0.resolution, download=cfg0.download)
    members = []
    for k, (cfg, report) in enumerate(zip(cfgs, reports, strict=True)):
        generator, discriminator, torch_rng = build_member_networks(cfg, device)
        opt_g, opt_d = single_trial_optimizers(generator, discriminator, cfg)
        noise = torch.Generator(device=device)
        noise.manual_seed(cfg.seed + 1)  # as train.py: latents have their own stream
        grid_latents = torch.randn(GRID_SAMPLES, cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed),
                                   device="cpu").to(device)
        members.append(Member(
            k, cfg, report, workdir / member_name(k), generator, discriminator, opt_g, opt_d,
            BatchSampler(source, cfg.batch_size, seed=cfg.seed, device=device), noise, torch_rng,
            DivergenceWatch(cfg.divergence), StepMonitor(cfg.divergence.grad_explosion, device),
            grid_latents))

    n_real = min(cfg0.eval_real, len(source))
    evaluator = Evaluator(  # every member shares the data and the metric settings: one evaluator
        cfg0.metric_names, real_images=real_images(source, n_real, seed=0),
        reference_key={"dataset": cfg0.dataset, "split": "train", "resolution": cfg0.resolution},
        n_generated=cfg0.eval_generated, n_real=n_real, cache_dir=Path(cfg0.cache_dir).expanduser(),
        inception_weights=cfg0.inception_weights, device=device,
    )

    if resume_from is not None:
        resume_members(members, Path(resume_from), device)
    active = [m for m in members if m.summary is None]
    if not active:
        return [m.summary for m in members]
    start = active[0].iteration

    for member in active:  # only now: bad input above leaves nothing behind
        member.workdir.mkdir(parents=True, exist_ok=True)
    pack = PackedGAN([m.generator for m in active], [m.discriminator for m in active],
                     [m.config for m in active], device, optimizers=[(m.opt_g, m.opt_d) for m in active])
    monitor = PackedStepMonitor([m.monitor for m in active], device)
    batch, z_dim, n_dis = cfg0.batch_size, cfg0.z_dim, cfg0.n_dis

    def latents() -> Tensor:
        return torch.stack([torch.randn(batch, z_dim, generator=m.noise, device=device) for m in active])

    def log_gradients(network: StackedNetwork, prefix: str, module_of) -> Any:
        def record(grad: Tensor) -> None:
            for row, member in enumerate(active):
                module = module_of(member)
                network.gradients_to(row, module, grad)
                member.logged |= gradient_norms(module, prefix)
        return record

    last_log_time, last_log_iteration = time.perf_counter(), start
    for iteration in range(start + 1, cfg0.iterations + 1):
        last = iteration == cfg0.iterations
        logging_step = last or any(iteration % every == 0
                                   for every in (cfg0.log_every, cfg0.eval_every, cfg0.checkpoint_every))
        for d_step in range(n_dis):
            real = torch.stack([m.sampler.next() for m in active])
            z = latents()
            log_d = logging_step and d_step == n_dis - 1
            loss_d, grad_norm_d, d_out, fake = pack.d_step(
                real, z, before_update=log_gradients(pack.discriminator, "grad_norm/D",
                                                     lambda m: m.discriminator) if log_d else None)
            monitor.update(iteration, loss_d, grad_norm_d)
        loss_g, grad_norm_g = pack.g_step(
            latents(), before_update=log_gradients(pack.generator, "grad_norm/G",
                                                   lambda m: m.generator) if logging_step else None)
        monitor.update(iteration, loss_g, grad_norm_g)
        if not logging_step:
            continue

        # A logging step: each member's modules take its state from the stacks, then train.py's logging.
        now = time.perf_counter()
        pack_it_per_s = (iteration - last_log_iteration) / max(now - last_log_time, 1e-9)
        d_real, d_fake = d_out[:, :batch], d_out[:, batch:]
        host = {name: value.tolist() for name, value in (
            ("loss_d", loss_d), ("loss_g", loss_g), ("d_real", d_real.mean(1)), ("d_fake", d_fake.mean(1)),
            ("d_real_min", d_real.amin(1)), ("d_fake_max", d_fake.amax(1)), ("grad_norm_d", grad_norm_d))}
        stopped, wrote_checkpoint = [], False
        for row, member in enumerate(active):
            cfg = member.config
            pack.generator.copy_to(row, member.generator)
            pack.discriminator.copy_to(row, member.discriminator)
            member.monitor = monitor.member(row)
            metrics, member.logged = member.logged, {}
            metrics |= {"iteration": iteration, "it_per_s": pack_it_per_s}
            metrics |= {key: host[key][row] for key in ("loss_d", "loss_g", "d_real", "d_fake", "d_real_min",
                                                        "d_fake_max")}
            metrics |= spectral_metrics(member.discriminator)
            member.watch.check_steps(member.monitor)
            metrics |= input_gradient_norms(member.discriminator, real[row], "grad_x_real")
            metrics |= input_gradient_norms(member.discriminator, fake[row], "grad_x_fake")
            member.watch.check_logging_step(iteration, grad_norm_d=host["grad_norm_d"][row],
                                            d_real_min=metrics["d_real_min"],
                                            d_fake_max=metrics["d_fake_max"])
            if member.watch.stop_event is None and (last or iteration % cfg.eval_every == 0):
                metrics |= member.evaluate(iteration, evaluator, device)
                member.objective = metrics[cfg.primary_metric]
                if not math.isfinite(member.objective):  # a recorded-only blow-up: the objective stays finite
                    member.objective = cfg.divergence.diverged_objective
                metrics["objective"] = member.objective

            stop = member.watch.stop_event
            metrics["diverged"] = int(stop is not None)
            save = stop is not None or last or iteration % cfg.checkpoint_every == 0
            if save:
                pack.generator.save_adam_state(row, member.generator, member.opt_g)
                pack.discriminator.save_adam_state(row, member.discriminator, member.opt_d)
                wrote_checkpoint = True
            if stop is not None or last:
                if stop is not None or member.objective is None:
                    member.objective = cfg.divergence.diverged_objective
                metrics |= {
                    "done": 1, "objective": member.objective,
                    "divergence_cause": stop.cause if stop else "",
                    "divergence_step": stop.iteration if stop else -1, "events": len(member.watch.events),
                }
                member.summary = finite_only(metrics)
                member.write_events()
                member.report(member.summary, member.save_checkpoint(iteration, summary=member.summary))
                stopped.append(row)
                continue
            if member.watch.events:
                member.write_events()
            member.report(finite_only(metrics), member.save_checkpoint(iteration) if save else None)

        if pack_report is not None:
            pack_report({"iteration": iteration, "it_per_s": pack_it_per_s * len(active),
                         "active_members": len(active) - len(stopped), "pack_size": len(members)},
                        str(workdir / PACK_CHECKPOINT) if wrote_checkpoint else None)
        if stopped:  # stopped members leave the stacks: the others go on, and no work is spent on them
            if len(stopped) == len(active):
                break
            rows = [row for row in range(len(active)) if row not in stopped]
            index = torch.tensor(rows, device=device)
            pack.keep(index)
            monitor.keep(index)
            active = [active[row] for row in rows]
        # it/s counts training only: evaluation, checkpoint and report time are left out of the next window
        last_log_time, last_log_iteration = time.perf_counter(), iteration
    return [m.summary for m in members]


def resume_members(members: list[Member], folder: Path, device: torch.device) -> None:
    """Load each member's state from a pack checkpoint; finished members report their summary again."""
    iterations = set()
    for member in members:
        path = folder / member_name(member.index) / CHECKPOINT_FILE
        if not path.exists():
            raise FileNotFoundError(f"resume_from: no checkpoint for member {member.index} at {path}")
        state = load_checkpoint(path, device)  # CRC-checked, weights_only, errors name the file
        saved = TrialConfig.model_validate_json(state["config"])
        if saved != member.config:
            differing = sorted(name for name in TrialConfig.model_fields
                               if getattr(saved, name) != getattr(member.config, name))
            raise ConfigError(f"configs[{member.index}]: differs from its checkpoint in "
                              f"{', '.join(differing)}; resume a pack with the configs it was started "
                              "with, in the same order")
        if "summary" in state:
            member.summary = json.loads(state["summary"])
            member.report(member.summary, None)
            continue
        member.load_checkpoint(state)
        iterations.add(member.iteration)
    if len(iterations) > 1:
        raise ValueError(f"resume_from: the unfinished members were saved at different iterations "
                         f"{sorted(iterations)}; the pack checkpoint was interrupted while being written")

