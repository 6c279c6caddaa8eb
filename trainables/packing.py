"""Trial packing: K compatible trials trained in one process as one batched computation.

`train_pack(configs, reports, workdir=...)` trains K configurations that differ only in `g_lr`, `d_lr`,
`beta1`, `beta2`, `scale`, `seed` (and their divergence thresholds) as one computation: each network's K
copies live as one stacked parameter tensor (K, N) (`torch.func.stack_module_state`, then flattened so that
the optimiser and the gradient norms are one kernel each), and every forward is
`torch.func.vmap(torch.func.functional_call)` over the members, which turns each convolution into one grouped
convolution. Buffers (G's batch-norm statistics, D's power-iteration vectors u, v) are stacked per member,
G's updated in place through vmap by its training forwards, D's by a vmapped power-iteration step after each
D update (trainables.normalization.advance_power_iterations, member by member). `PackedAdam` is
torch.optim.Adam's update with each member's own lr and betas.

Only the step is packed (`PackedStep`, the vmapped counterpart of train.py's `SingleStep`). Each member is a
`trainables.trial.Trial`, built, checkpointed, evaluated and logged by the same code as a single trial: the
same initialisation, data stream and latents as `train(config_k)`, the same `report(metrics,
checkpoint_dir)` contract and keys, its own divergence watch and events, samples and events under
`workdir/member_<k>/`, and its own checkpoint `workdir/checkpoint/member_<k>/state.pt` in train.py's format,
which `train(config_k, resume_from=...)` can also resume alone. A member that stops (a divergence cause whose
policy is `stop`) reports `done` with its cause and step and leaves the pack: the stacks keep only the active
members, so the others go on unchanged and a stopped member costs nothing more.

Every variant packs; the WGAN-GP loss does not (its gradient penalty differentiates D's input gradient,
which needs torch.func.grad inside vmap), and so neither do the learned-gamma SN variants with their default
loss (they pack with `loss: hinge`). Train those with `train()`.

`it_per_s` in each member's report is the pack's iteration rate (every member advances at it);
`pack_report`, if given, receives the pack's own rate summed over its active members.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
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
from trainables.diagnostics import gradient_norms
from trainables.events import StepMonitor, stacked_parameter_norms
from trainables.losses import discriminator_loss, generator_loss
from trainables.normalization import SpectralNormalization, power_iterations
from trainables.trial import (
    CHECKPOINT_FILE,
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
        self.power_iterations = power_iterations(self.template)

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

    @torch.no_grad()
    def advance_power_iterations(self) -> None:
        """Each member's stored u, v take their steps on its new weights (normalization's, vmapped)."""
        params = self.parameters(detach=True)
        for item in self.power_iterations:
            u, v = vmap(partial(item.estimator.advanced, n_power_iterations=item.steps))(
                params[item.weight], self.buffers[f"{item.name}.u"])
            self.buffers[f"{item.name}.u"].copy_(u)
            self.buffers[f"{item.name}.v"].copy_(v)

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


class PackedStep:
    """The packed training step (trainables.trial.Step): K members' D and G steps, each as train.py's.

    real: (K, B, 3, R, R) in [-1, 1]; z: (K, B, z_dim). Members are rows, in the order of `trials`; the member
    trials' own modules and optimisers seed the stacks and receive them back (`write_members`, checkpoints).
    """

    def __init__(self, trials: list[Trial]):
        configs = [trial.config for trial in trials]
        device = trials[0].device
        scaled = configs[0].variant in SCALED_VARIANTS
        self.loss = configs[0].loss
        self.trials = list(trials)
        self.generator = StackedNetwork(
            [t.generator for t in trials], [t.opt_g for t in trials], lr=[c.g_lr for c in configs],
            beta1=[c.beta1 for c in configs], beta2=[c.beta2 for c in configs], scales=None, device=device)
        self.discriminator = StackedNetwork(
            [t.discriminator for t in trials], [t.opt_d for t in trials], lr=[c.d_lr for c in configs],
            beta1=[c.beta1 for c in configs], beta2=[c.beta2 for c in configs],
            scales=[c.scale for c in configs] if scaled else None, device=device)
        for trial in trials:  # a member's checkpoint holds its Adam state in train.py's format
            trial.before_checkpoint = partial(self.save_adam_state, trial)

    def d_step(self, real: Tensor, z: Tensor, *, layer_norms: bool = False) -> DStep:
        d = self.discriminator
        with torch.no_grad():
            fake = self.generator(z)  # G in training mode: its batch-norm statistics move, as in train.py
        logits = d(torch.cat([real, fake], dim=1))  # one D forward on real and fake, as train.py
        batch = real.shape[1]
        loss = vmap(partial(discriminator_loss, self.loss))(logits[:, :batch], logits[:, batch:])
        (grad,) = torch.autograd.grad(loss.sum(), d.flat)  # members are independent: row k is k's gradient
        grad_norm = d.row_norms(grad)
        layers = self._layer_norms(d, grad, "discriminator", "grad_norm/D") if layer_norms else None
        d.adam.step(d.flat, grad)
        d.advance_power_iterations()
        return DStep(loss.detach(), grad_norm, stacked_parameter_norms(grad, d.sizes), logits.detach(), fake,
                     layers)

    def g_step(self, z: Tensor, *, layer_norms: bool = False) -> GStep:
        g, d = self.generator, self.discriminator
        logits = d(g(z), detach_parameters=True)  # as train.py: its power iterations are not stored
        loss = vmap(partial(generator_loss, self.loss))(logits)
        (grad,) = torch.autograd.grad(loss.sum(), g.flat)
        grad_norm = g.row_norms(grad)
        layers = self._layer_norms(g, grad, "generator", "grad_norm/G") if layer_norms else None
        g.adam.step(g.flat, grad)
        return GStep(loss.detach(), grad_norm, stacked_parameter_norms(grad, g.sizes), layers)

    def _layer_norms(self, network: StackedNetwork, grad: Tensor, module: str, prefix: str) -> list[dict]:
        """Each member's per-layer gradient norms, by train.py's own function on the member's module."""
        norms = []
        for row, trial in enumerate(self.trials):
            network.gradients_to(row, getattr(trial, module), grad)
            norms.append(gradient_norms(getattr(trial, module), prefix))
        return norms

    def real(self) -> Tensor:
        return torch.stack([trial.sampler.next() for trial in self.trials])

    def latents(self, batch: int) -> Tensor:
        return torch.stack([trial.latents(batch) for trial in self.trials])

    def write_members(self) -> None:
        """Each member's weights and buffers into its trial's modules (for its diagnostics and checkpoint)."""
        for row, trial in enumerate(self.trials):
            self.generator.copy_to(row, trial.generator)
            self.discriminator.copy_to(row, trial.discriminator)

    def save_adam_state(self, trial: Trial) -> None:
        row = self.trials.index(trial)
        self.generator.save_adam_state(row, trial.generator, trial.opt_g)
        self.discriminator.save_adam_state(row, trial.discriminator, trial.opt_d)

    def keep(self, trials: list[Trial]) -> Tensor:
        """Keep only these members, in this order; returns their rows before."""
        rows = torch.tensor([self.trials.index(trial) for trial in trials], device=self.generator.flat.device)
        self.generator.keep(rows)
        self.discriminator.keep(rows)
        self.trials = list(trials)
        return rows


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
        whenever the members' checkpoints were written at that step (else None): what a scheduler checkpoints.
    """
    cfgs = check_pack(list(configs))
    if len(reports) != len(cfgs):
        raise ValueError(f"reports: need one report callable per config ({len(cfgs)}), got {len(reports)}")
    cfg0 = cfgs[0]
    workdir = Path(workdir)
    source = training_images(cfg0)
    evaluation = build_evaluation(cfg0, source)  # every member shares the data and the metrics
    trials = [Trial.build(cfg, report, source, evaluation, workdir=workdir / member_name(k),
                          checkpoint_dir=workdir / PACK_CHECKPOINT / member_name(k))
              for k, (cfg, report) in enumerate(zip(cfgs, reports, strict=True))]
    if resume_from is not None:
        resume_members(trials, Path(resume_from))
    active = [trial for trial in trials if trial.summary is None]
    if not active:
        return [trial.summary for trial in trials]

    for trial in active:  # only now: bad input above leaves nothing behind
        trial.workdir.mkdir(parents=True, exist_ok=True)
    step = PackedStep(active)
    monitor = StepMonitor.stack([trial.monitor for trial in active])
    rate = TrainingRate(active[0].iteration)
    for iteration in range(active[0].iteration + 1, cfg0.iterations + 1):
        logging_step = is_logging_step(cfg0, iteration)
        real, d, g = train_iteration(step, monitor, cfg0, iteration, step.real, step.latents,
                                     layer_norms=logging_step)
        if not logging_step:
            continue

        # A logging step: each member's modules take its state from the stacks, then the trial's own logging.
        it_per_s = rate(iteration)
        values = {key: value.tolist() for key, value in logged_values(d, g).items()}
        step.write_members()
        ended = []
        for row, trial in enumerate(active):
            trial.monitor = monitor.member(row)
            if trial.log(iteration, {key: value[row] for key, value in values.items()}, real=real[row],
                         fake=d.fake[row], layer_norms=d.layers[row] | g.layers[row], it_per_s=it_per_s):
                ended.append(trial)
        if pack_report is not None:
            last = iteration == cfg0.iterations
            checkpointed = bool(ended) or last or iteration % cfg0.checkpoint_every == 0
            pack_report({"iteration": iteration, "it_per_s": it_per_s * len(active),
                         "active_members": len(active) - len(ended), "pack_size": len(trials)},
                        str(workdir / PACK_CHECKPOINT) if checkpointed else None)
        if ended:  # ended members leave the stacks: the others go on, and no work is spent on them
            active = [trial for trial in active if trial not in ended]
            if not active:
                break
            monitor.keep(step.keep(active))
        rate.restart(iteration)  # evaluation, checkpoint and report time are left out of the next window
    return [trial.summary for trial in trials]


def resume_members(trials: list[Trial], folder: Path) -> None:
    """Load each member's state from a pack checkpoint; ended members report their summary again."""
    iterations = set()
    for k, trial in enumerate(trials):
        member_folder = folder / member_name(k)
        if not (member_folder / CHECKPOINT_FILE).exists():
            raise FileNotFoundError(f"resume_from: no checkpoint for member {k} at "
                                    f"{member_folder / CHECKPOINT_FILE}")
        if not trial.resume(member_folder, what=f"configs[{k}]"):
            iterations.add(trial.iteration)
    if len(iterations) > 1:
        raise ValueError(f"resume_from: the unfinished members were saved at different iterations "
                         f"{sorted(iterations)}; the pack checkpoint was interrupted while being written")
