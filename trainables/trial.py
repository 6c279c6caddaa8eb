"""One trial's state, shared by the single trial (train.py) and the pack (packing.py).

Building a trial, its checkpoints, its divergence events, its evaluation, its logging step and its finish are
written here once. Only the step differs: train.py's `SingleStep` (eager or compiled) and packing.py's
`PackedStep` (vmapped over the members) both implement `Step`, and the benches time those same steps.

Nothing after `Trial.build` draws from torch's global RNG: the data stream, the latents and the WGAN-GP
interpolates each have their own generator, saved in the checkpoint, so a resumed trial continues exactly.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from trainables.config import ConfigError, TrialConfig
from trainables.data import BatchSampler, ImageSource, load_images, real_images
from trainables.diagnostics import (
    ConvOperatorProbe,
    DiversityProbe,
    input_gradient_norms,
    layer_of,
    save_sample_grid,
    spectral_metrics,
    theory_metrics,
)
from trainables.events import DivergenceWatch, StepMonitor
from trainables.files import atomic_path, write_text_atomically
from trainables.metrics import Evaluator
from trainables.metrics.reference import data_location
from trainables.networks import build_discriminator, build_generator
from trainables.normalization import normalize

Report = Callable[[dict[str, Any], "str | None"], None]
CHECKPOINT_FILE = "state.pt"
GRID_SAMPLES = 64  # images in each evaluation's sample grid (and the mode-collapse diversity)


class CheckpointError(OSError):
    """A checkpoint that cannot be read back (corrupt, truncated, not tensors) or written (disk full)."""


def resolve_device(name: str) -> torch.device:
    """The torch device of a config's `device` (config.DEVICES); ConfigError when this machine lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        valid = ["auto", "cpu"] + (["cuda"] if count else []) + [f"cuda:{index}" for index in range(count)]
        raise ConfigError(f"device: {name} does not exist on this machine, which has {count} CUDA device(s); "
                          f"valid here: {', '.join(valid)}")
    return device


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """A state.pt written by `Trial.save_checkpoint`, checked whole first: torch.load misses a flipped byte.

    Only tensors and plain data load (weights_only=True): a checkpoint that would run code is refused.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # the CRC-32 of every record torch.save wrote
        if damaged is not None:
            raise CheckpointError(f"checkpoint {path} is corrupt: record {damaged} fails its CRC check")
        return torch.load(path, map_location=device, weights_only=True)
    except (zipfile.BadZipFile, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded, it is truncated, corrupt or not a "
                              f"checkpoint of this trainer ({first_line})") from None


def finite_only(metrics: dict[str, Any]) -> dict[str, Any]:
    """Drop non-finite numbers: NaN and inf break ASHA and Optuna. The events log keeps what they were."""
    return {key: value for key, value in metrics.items()
            if not isinstance(value, float) or math.isfinite(value)}


# ---- the step: what differs between a single trial and a pack --------------------------------------------

@dataclass
class DStep:
    """One D step's results. A single trial: loss and grad_norm 0-dim, param_norms (P,) the gradient norm of
    each trainable parameter (for the divergence monitor's layer), logits (2B,) on real then fake, fake
    (B, 3, R, R). A pack: each with a leading member dim K. `layers`: the per-layer gradient norms
    (`grad_norm/D/<layer>`, host floats) when asked for, one dict per member of a pack."""

    loss: Tensor
    grad_norm: Tensor
    param_norms: Tensor
    logits: Tensor
    fake: Tensor
    layers: Any = None


@dataclass
class GStep:
    """One G step's results, shaped as DStep's; `layers` holds `grad_norm/G/<layer>`."""

    loss: Tensor
    grad_norm: Tensor
    param_norms: Tensor
    layers: Any = None


class Step(Protocol):
    """n_dis D steps then one G step make an iteration. real (B, 3, R, R) in [-1, 1], z (B, z_dim); a pack's
    with a leading member dim. Each step updates its network (Adam) and returns what the loop watches."""

    def d_step(self, real: Tensor, z: Tensor, *, layer_norms: bool = False) -> DStep: ...

    def g_step(self, z: Tensor, *, layer_norms: bool = False) -> GStep: ...


def train_iteration(step: Step, monitor: StepMonitor, cfg: TrialConfig, iteration: int,
                    real: Callable[[], Tensor], latents: Callable[[int], Tensor], *,
                    layer_norms: bool = False) -> tuple[Tensor, DStep, GStep]:
    """One iteration: cfg.n_dis D steps, then one G step, each watched by the monitor on the device.

    real(): the next real batch (d_batch_size images); latents(n): the next n latents (d_batch_size for a D
    step, g_batch_size for the G step). Returns the last D step's real batch and results and the G step's,
    which a logging step reads; layer_norms: also the per-layer gradient norms of those two steps.
    """
    for d_index in range(cfg.n_dis):
        real_batch = real()
        d = step.d_step(real_batch, latents(cfg.d_batch_size),
                        layer_norms=layer_norms and d_index == cfg.n_dis - 1)
        monitor.update(iteration, "D", d.loss, d.grad_norm, d.param_norms)
    g = step.g_step(latents(cfg.g_batch_size), layer_norms=layer_norms)
    monitor.update(iteration, "G", g.loss, g.grad_norm, g.param_norms)
    return real_batch, d, g


def logged_values(d: DStep, g: GStep) -> dict[str, Tensor]:
    """The scalars a logging step reports, still on the device: 0-dim for a trial, (K,) for a pack."""
    batch = d.fake.shape[-4]
    d_real, d_fake = d.logits[..., :batch], d.logits[..., batch:]
    return {"loss_d": d.loss, "loss_g": g.loss, "d_real": d_real.mean(-1), "d_fake": d_fake.mean(-1),
            "d_real_min": d_real.amin(-1), "d_fake_max": d_fake.amax(-1), "grad_norm_d": d.grad_norm,
            "grad_norm_g": g.grad_norm}


# ---- the schedule ------------------------------------------------------------------------------------------

def is_logging_step(cfg: TrialConfig, iteration: int) -> bool:
    """Logging, evaluation and checkpoint steps all read tensors on the host, so they share one schedule."""
    return iteration == cfg.iterations or any(
        iteration % every == 0 for every in (cfg.log_every, cfg.eval_every, cfg.checkpoint_every))


class TrainingRate:
    """Iterations per second of training alone: logging steps (evaluation, checkpoint, report) left out."""

    def __init__(self, iteration: int):
        self.restart(iteration)

    def restart(self, iteration: int) -> None:
        self.started, self.iteration = time.perf_counter(), iteration

    def __call__(self, iteration: int) -> float:
        return (iteration - self.iteration) / max(time.perf_counter() - self.started, 1e-9)


def training_images(cfg: TrialConfig) -> ImageSource:
    """The trial's dataset; fails here, before any training, when its files are missing."""
    return load_images(cfg.dataset, cfg.data_root, cfg.resolution, download=cfg.download,
                       split=cfg.celeba_split)


@dataclass
class Evaluation:
    """What a trial's evaluations are judged with, built once from one real set (the same for every seed and
    every member of a pack): the metrics, and the sample grid's diversity and class coverage."""

    metrics: Evaluator
    diversity: DiversityProbe


def build_evaluation(cfg: TrialConfig, source: ImageSource) -> Evaluation:
    device = resolve_device(cfg.device)
    n_real = min(cfg.eval_real, len(source))
    real = real_images(source, n_real, seed=0)
    cache_dir = Path(cfg.cache_dir).expanduser()
    metrics = Evaluator(
        cfg.metric_names, real_images=real,
        reference_key={"dataset": cfg.dataset, "split": source.split, "resolution": cfg.resolution,
                       "location": data_location(cfg.dataset, cfg.data_root)},
        n_generated=cfg.eval_generated, n_generated_is=cfg.eval_generated_is, n_real=n_real,
        cache_dir=cache_dir, inception_weights=cfg.inception_weights, device=device,
    )
    return Evaluation(metrics, DiversityProbe.for_dataset(cfg.dataset, real, grid_size=GRID_SAMPLES,
                                                          cache_dir=cache_dir, device=device))


# ---- one trial -------------------------------------------------------------------------------------------

@dataclass
class Trial:
    """Everything one trial keeps besides its step: networks, optimisers, streams, watch, schedule state.

    workdir receives `samples/iter_XXXXXXX.png` and `events.json`; checkpoint_dir `state.pt`. A pack keeps its
    members' weights in stacks and writes them into `generator` / `discriminator` at each logging step.
    """

    config: TrialConfig
    report: Report
    evaluation: Evaluation
    workdir: Path
    checkpoint_dir: Path
    device: torch.device
    generator: nn.Module
    discriminator: nn.Module  # normalized in place through parametrizations
    opt_g: torch.optim.Adam
    opt_d: torch.optim.Adam
    sampler: BatchSampler
    noise: torch.Generator  # latents and WGAN-GP interpolates
    monitor: StepMonitor
    watch: DivergenceWatch
    grid_latents: Tensor
    conv_operator: ConvOperatorProbe  # sigma_conv of every D layer at evaluations
    iteration: int = 0
    objective: float | None = None
    summary: dict[str, Any] | None = None  # the final report, once the trial has ended
    # A pack's hook: write this member's packed Adam state into opt_g / opt_d before they are saved.
    before_checkpoint: Callable[[], None] | None = field(default=None, repr=False)

    @classmethod
    def build(cls, cfg: TrialConfig, report: Report, source: ImageSource, evaluation: Evaluation, *,
              workdir: Path, checkpoint_dir: Path) -> Trial:
        """Seeded networks, normalization, optimisers and streams: the same for a trial and a pack member."""
        device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        generator = build_generator(cfg.architecture, cfg.resolution, z_dim=cfg.z_dim, width=cfg.width)
        discriminator = build_discriminator(cfg.architecture, cfg.resolution, width=cfg.width)
        generator, discriminator = generator.to(device), discriminator.to(device)
        example_input = torch.zeros(1, 3, cfg.resolution, cfg.resolution, device=device)
        normalize(discriminator, cfg.variant, scale=cfg.scale, n_power_iterations=cfg.n_power_iterations,
                  grad_through_power_iteration=cfg.sn_grad_through_power_iteration,
                  example_input=example_input)
        betas = (cfg.beta1, cfg.beta2)
        fused = True if cfg.compile and device.type == "cuda" else None  # the fast trial: one kernel per step
        noise = torch.Generator(device=device)
        noise.manual_seed(cfg.seed + 1)
        trainable = {name: [layer_of(key) for key, p in network.named_parameters() if p.requires_grad]
                     for name, network in (("D", discriminator), ("G", generator))}  # the monitor's layers
        constant_level = evaluation.metrics.constant_level(cfg.primary_metric)
        return cls(
            config=cfg, report=report, evaluation=evaluation, workdir=workdir, checkpoint_dir=checkpoint_dir,
            device=device,
            generator=generator, discriminator=discriminator,
            opt_g=torch.optim.Adam(generator.parameters(), lr=cfg.g_lr, betas=betas, fused=fused),
            opt_d=torch.optim.Adam(discriminator.parameters(), lr=cfg.d_lr, betas=betas, fused=fused),
            sampler=BatchSampler(source, cfg.d_batch_size, seed=cfg.seed, device=device), noise=noise,
            monitor=StepMonitor(cfg.divergence, device, layers=trainable),
            watch=DivergenceWatch(cfg.divergence, constant_level=constant_level),
            grid_latents=torch.randn(GRID_SAMPLES, cfg.z_dim,
                                     generator=torch.Generator().manual_seed(cfg.seed)).to(device),
            conv_operator=ConvOperatorProbe(discriminator, example_input),
        )

    def latents(self, batch: int) -> Tensor:
        """The next `batch` latents (batch, z_dim) from the trial's own stream."""
        return torch.randn(batch, self.config.z_dim, generator=self.noise, device=self.device)

    # -- checkpoints --

    def resume(self, folder: Path, *, what: str = "config") -> bool:
        """Load the trial's state from a checkpoint folder; True when the trial had already ended (its final
        report is given again and nothing is trained). ConfigError naming the fields when the checkpoint was
        written with another config (`what`: how the caller names this config in the message)."""
        state = load_checkpoint(folder / CHECKPOINT_FILE, self.device)
        saved = TrialConfig.model_validate_json(state["config"])
        if saved != self.config:
            differing = sorted(name for name in TrialConfig.model_fields
                               if getattr(saved, name) != getattr(self.config, name))
            raise ConfigError(f"{what}: differs from its checkpoint in {', '.join(differing)} "
                              f"({folder / CHECKPOINT_FILE}); resume with the config it was started with")
        if "summary" in state:
            self.summary = json.loads(state["summary"])
            self.report(self.summary, None)
            return True
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sampler.load_state_dict(state["sampler"])
        self.noise.set_state(state["noise"].cpu())
        self.monitor.load_state_dict(state["monitor"])
        self.watch.load_state_dict(state["watch"])
        self.iteration, self.objective = state["iteration"], state["objective"]
        return False

    def save_checkpoint(self, iteration: int, summary: dict[str, Any] | None = None) -> str:
        """Write checkpoint_dir/state.pt atomically; a full disk keeps the previous one and names the file."""
        if self.before_checkpoint is not None:
            self.before_checkpoint()
        state = {
            "iteration": iteration, "objective": self.objective, "config": self.config.model_dump_json(),
            "generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "sampler": self.sampler.state_dict(), "noise": self.noise.get_state(),
            "monitor": self.monitor.state_dict(), "watch": self.watch.state_dict(),
        }
        if summary is not None:
            state["summary"] = json.dumps(summary)
        path = self.checkpoint_dir / CHECKPOINT_FILE
        try:
            with atomic_path(path) as partial:
                torch.save(state, partial)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
            raise CheckpointError(
                f"cannot write checkpoint {path} ({str(exc).strip()}); {shutil.disk_usage(path.parent).free} "
                "bytes free there; the previous checkpoint is kept"
            ) from None
        return str(self.checkpoint_dir)

    def write_events(self) -> None:
        write_text_atomically(self.workdir / "events.json",
                              json.dumps([event.to_json() for event in self.watch.events], indent=2))

    # -- evaluation and the logging step --

    def evaluate(self, iteration: int) -> dict[str, float]:
        """The metrics, the sample grid and its diversity, every D layer's conv operator σ and the
        evaluation's divergence checks."""
        cfg, generator = self.config, self.generator
        generator.eval()
        eval_noise = torch.Generator(device=self.device).manual_seed(cfg.seed * 1_000_003 + iteration)

        @torch.no_grad()
        def generate(batch: int) -> Tensor:
            z = torch.randn(batch, cfg.z_dim, generator=eval_noise, device=self.device)
            return ((generator(z) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

        with torch.no_grad():
            grid = generator(self.grid_latents)
        metrics = self.evaluation.metrics(generate)
        generator.train()
        save_sample_grid(grid, self.workdir / "samples" / f"iter_{iteration:07d}.png")
        diversity = self.evaluation.diversity(grid)
        metrics |= diversity | self.conv_operator()
        self.watch.check_evaluation(iteration, cfg.primary_metric, metrics[cfg.primary_metric], diversity)
        return metrics

    def log(self, iteration: int, values: dict[str, float], *, real: Tensor, fake: Tensor,
            layer_norms: dict[str, float], it_per_s: float) -> bool:
        """A logging step: diagnostics, divergence checks, an evaluation when due, the report and checkpoint.

        values: `logged_values` on the host; real, fake: this step's batches (B, 3, R, R); layer_norms: the
        per-layer gradient norms of D and G. Every variant also logs the paper's theory per D layer
        (`theory_metrics`: σ of the raw and effective weight, the effective weight's std and its
        prediction). The trial's modules must hold its current weights. Returns True when the trial has
        ended (its summary reported with the last checkpoint).
        """
        cfg = self.config
        last = iteration == cfg.iterations
        metrics: dict[str, Any] = {**layer_norms, "iteration": iteration, "it_per_s": it_per_s}
        metrics |= {key: values[key] for key in ("loss_d", "loss_g", "d_real", "d_fake", "d_real_min",
                                                 "d_fake_max")}
        metrics |= spectral_metrics(self.discriminator) | theory_metrics(self.discriminator)
        self.watch.check_steps(self.monitor, iteration)
        metrics |= input_gradient_norms(self.discriminator, real, "grad_x_real")
        metrics |= input_gradient_norms(self.discriminator, fake, "grad_x_fake")
        self.watch.check_logging_step(iteration, grad_norm_d=values["grad_norm_d"],
                                      grad_norm_g=values["grad_norm_g"], d_real_min=values["d_real_min"],
                                      d_fake_max=values["d_fake_max"])
        if self.watch.stop_event is None and (last or iteration % cfg.eval_every == 0):
            metrics |= self.evaluate(iteration)
            self.objective = metrics[cfg.primary_metric]
            if not math.isfinite(self.objective):  # a recorded-only blow-up: the objective stays finite
                self.objective = cfg.divergence.diverged_objective
            metrics["objective"] = self.objective

        stop = self.watch.stop_event
        metrics["diverged"] = int(stop is not None)
        if stop is not None or last:
            if stop is not None or self.objective is None:
                self.objective = cfg.divergence.diverged_objective
            divergence = self.watch.divergence  # the stop's, or a recorded one that never recovered
            metrics |= {
                "done": 1, "objective": self.objective, "outcome": self.watch.outcome,
                "divergence_cause": divergence[0] if divergence else "",
                "divergence_step": divergence[1] if divergence else -1, "events": len(self.watch.events),
            }
            self.summary = finite_only(metrics)
            self.write_events()
            self.report(self.summary, self.save_checkpoint(iteration, summary=self.summary))
            return True
        if self.watch.events:
            self.write_events()
        checkpoint = self.save_checkpoint(iteration) if iteration % cfg.checkpoint_every == 0 else None
        self.report(finite_only(metrics), checkpoint)
        return False
