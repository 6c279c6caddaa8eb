"""One GAN training run: `train(config, report, workdir=...)`.

Reads top to bottom: config and device, data, networks and normalization, optimisers, evaluation, then the
loop. One iteration is `n_dis` discriminator steps and one generator step. The loop itself never reads a
tensor on the host; logging, evaluation and checkpoint steps do (and only they). The trial knows nothing of
Ray or MLflow: `report(metrics, checkpoint_dir)` is its only channel out (the README lists its keys).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainables.config import TrialConfig, parse_config
from trainables.data import BatchSampler, load_images, real_images
from trainables.diagnostics import (
    gradient_norms,
    input_gradient_norms,
    sample_diversity,
    save_sample_grid,
    spectral_metrics,
)
from trainables.events import DivergenceWatch, StepMonitor
from trainables.losses import discriminator_loss, generator_loss, gradient_penalty
from trainables.metrics import Evaluator
from trainables.networks import build_discriminator, build_generator
from trainables.normalization import PowerIterationStarts, frozen_parametrizations, normalize

Report = Callable[[dict[str, Any], "str | None"], None]
CHECKPOINT_FILE = "state.pt"
GRID_SAMPLES = 64  # images in each evaluation's sample grid (and the mode-collapse diversity)


class CheckpointError(OSError):
    """A checkpoint that cannot be read back (corrupt, truncated, not tensors) or written (disk full)."""


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """A state.pt written by `train`, checked whole first: torch.load misses a flipped byte in a tensor.

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(config: TrialConfig | dict, report: Report, *, workdir: str | Path,
          resume_from: str | Path | None = None) -> dict[str, Any]:
    """Train one configuration; report metrics and checkpoints; return the final summary (also reported).

    workdir receives `samples/iter_XXXXXXX.png`, `events.json` and `checkpoint/state.pt`.
    resume_from: a checkpoint folder written by an earlier call with the same config.
    """
    cfg = parse_config(config)
    workdir = Path(workdir)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    # Data: fails here, before any training, when files are missing.
    source = load_images(cfg.dataset, cfg.data_root, cfg.resolution, download=cfg.download)
    sampler = BatchSampler(source, cfg.batch_size, seed=cfg.seed, device=device)
    noise = torch.Generator(device=device)
    noise.manual_seed(cfg.seed + 1)  # latents and interpolates: their own stream, saved in checkpoints

    # Networks: D's normalization is applied in place through parametrizations.
    generator = build_generator(cfg.architecture, cfg.resolution, z_dim=cfg.z_dim, width=cfg.width).to(device)
    discriminator = build_discriminator(cfg.architecture, cfg.resolution, width=cfg.width).to(device)
    normalize(discriminator, cfg.variant, scale=cfg.scale, n_power_iterations=cfg.n_power_iterations,
              grad_through_power_iteration=cfg.sn_grad_through_power_iteration,
              example_input=torch.zeros(1, 3, cfg.resolution, cfg.resolution, device=device))
    betas = (cfg.beta1, cfg.beta2)
    fused = True if cfg.compile and device.type == "cuda" else None  # one kernel per Adam step
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.g_lr, betas=betas, fused=fused)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.d_lr, betas=betas, fused=fused)
    # The training steps' forwards; evaluation and diagnostics use the eager modules (the same parameters).
    train_g, train_d = generator, discriminator
    if cfg.compile:
        mode = "reduce-overhead" if device.type == "cuda" else "default"  # CUDA graphs: no launch per kernel
        # fullgraph: a graph break would split the CUDA graphs and bring back a launch per kernel around it.
        # The reset: in a worker process reused for several trials, earlier trials' graphs would count
        # toward dynamo's recompile limit (8 per code object), beyond which fullgraph fails.
        torch.compiler.reset()
        compiled_g = torch.compile(generator, mode=mode, fullgraph=True)
        compiled_d = torch.compile(discriminator, mode=mode, fullgraph=True)
        power_iteration_starts = PowerIterationStarts(discriminator)

        # The outputs are copies: CUDA graphs reuse an output's memory once the next compiled call starts,
        # and the loop reads fake and D's output after later calls (the WGAN-GP penalty, logging steps).
        def train_g(z: torch.Tensor) -> torch.Tensor:
            return compiled_g(z).clone()

        def train_d(images: torch.Tensor) -> torch.Tensor:
            power_iteration_starts.refresh()  # where this forward's power iterations start: the current u
            return compiled_d(images).clone()

    n_real = min(cfg.eval_real, len(source))
    evaluator = Evaluator(
        cfg.metric_names, real_images=real_images(source, n_real, seed=0),  # one reference set for every seed
        reference_key={"dataset": cfg.dataset, "split": "train", "resolution": cfg.resolution},
        n_generated=cfg.eval_generated, n_real=n_real, cache_dir=Path(cfg.cache_dir).expanduser(),
        inception_weights=cfg.inception_weights, device=device,
    )
    grid_latents = torch.randn(GRID_SAMPLES, cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed),
                               device="cpu").to(device)

    monitor = StepMonitor(cfg.divergence.grad_explosion, device)
    watch = DivergenceWatch(cfg.divergence)
    checkpoint_dir = workdir / "checkpoint"
    start, objective = 0, None
    if resume_from is not None:
        state = load_checkpoint(Path(resume_from) / CHECKPOINT_FILE, device)
        if "summary" in state:  # the trial had already finished: report its result again, train nothing
            summary = json.loads(state["summary"])
            report(summary, None)
            return summary
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        sampler.load_state_dict(state["sampler"])
        noise.set_state(state["noise"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        monitor.load_state_dict(state["monitor"])
        watch.load_state_dict(state["watch"])
        start, objective = state["iteration"], state["objective"]

    def save_checkpoint(iteration: int, summary: dict | None = None) -> str:
        state = {
            "iteration": iteration, "objective": objective, "config": cfg.model_dump_json(),
            "generator": generator.state_dict(), "discriminator": discriminator.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "sampler": sampler.state_dict(),
            "noise": noise.get_state(), "torch_rng": torch.get_rng_state(),
            "monitor": monitor.state_dict(), "watch": watch.state_dict(),
        }
        if summary is not None:
            state["summary"] = json.dumps(summary)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        partial = checkpoint_dir / (CHECKPOINT_FILE + ".partial")
        try:
            torch.save(state, partial)
            os.replace(partial, checkpoint_dir / CHECKPOINT_FILE)  # atomic: a crash leaves the previous whole
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
            partial.unlink(missing_ok=True)
            raise CheckpointError(
                f"cannot write checkpoint {checkpoint_dir / CHECKPOINT_FILE} ({str(exc).strip()}); "
                f"{shutil.disk_usage(checkpoint_dir).free} bytes free there; the previous checkpoint is kept"
            ) from None
        return str(checkpoint_dir)

    def write_events() -> None:
        partial = workdir / "events.json.partial"
        partial.write_text(json.dumps([event.to_json() for event in watch.events], indent=2))
        partial.replace(workdir / "events.json")

    def evaluate(iteration: int) -> dict[str, float]:
        generator.eval()
        eval_noise = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + iteration)

        @torch.no_grad()
        def generate(batch: int) -> torch.Tensor:
            z = torch.randn(batch, cfg.z_dim, generator=eval_noise, device=device)
            return ((generator(z) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

        with torch.no_grad():
            grid = generator(grid_latents)
        metrics = evaluator(generate)
        generator.train()
        save_sample_grid(grid, workdir / "samples" / f"iter_{iteration:07d}.png")
        metrics.update(spectral_metrics(discriminator, conv_operator=True))
        primary = metrics[cfg.primary_metric]
        watch.check_evaluation(iteration, cfg.primary_metric, primary, sample_diversity(grid))
        return metrics

    workdir.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves nothing behind
    d_params = [p for p in discriminator.parameters() if p.requires_grad]
    g_params = [p for p in generator.parameters() if p.requires_grad]
    last_log_time, last_log_iteration = time.perf_counter(), start
    for iteration in range(start + 1, cfg.iterations + 1):
        last = iteration == cfg.iterations
        logging_step = last or any(iteration % every == 0
                                   for every in (cfg.log_every, cfg.eval_every, cfg.checkpoint_every))
        metrics: dict[str, Any] = {}
        for d_step in range(cfg.n_dis):
            real = sampler.next()
            z = torch.randn(cfg.batch_size, cfg.z_dim, generator=noise, device=device)
            with torch.no_grad():
                fake = train_g(z)
            # One D forward on real and fake together: one power iteration per D step, as the official code.
            d_out = train_d(torch.cat([real, fake]))
            loss_d = discriminator_loss(cfg.loss, d_out[: cfg.batch_size], d_out[cfg.batch_size:])
            if cfg.loss == "wgan_gp":
                loss_d = loss_d + gradient_penalty(discriminator, real, fake, weight=cfg.gp_weight,
                                                   generator=noise)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            grad_norm_d = torch.nn.utils.get_total_norm([p.grad for p in d_params if p.grad is not None])
            monitor.update(iteration, loss_d.detach(), grad_norm_d)
            if logging_step and d_step == cfg.n_dis - 1:
                metrics |= gradient_norms(discriminator, "grad_norm/D")
            opt_d.step()
        d_real, d_fake = d_out.detach()[: cfg.batch_size], d_out.detach()[cfg.batch_size:]

        # G step: D's weights need no gradients, only the path through D to G; and, as in the official code,
        # D's forward here advances no power iteration (u, v as the last D step left them).
        for p in d_params:
            p.requires_grad_(False)
        z = torch.randn(cfg.batch_size, cfg.z_dim, generator=noise, device=device)
        with frozen_parametrizations(discriminator):
            loss_g = generator_loss(cfg.loss, train_d(train_g(z)))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        for p in d_params:
            p.requires_grad_(True)
        grad_norm_g = torch.nn.utils.get_total_norm([p.grad for p in g_params if p.grad is not None])
        if logging_step:
            metrics |= gradient_norms(generator, "grad_norm/G")
        opt_g.step()
        monitor.update(iteration, loss_g.detach(), grad_norm_g)
        if not logging_step:
            continue

        # A logging step: the only place the loop reads tensors on the host.
        now = time.perf_counter()
        metrics |= {
            "iteration": iteration,
            "it_per_s": (iteration - last_log_iteration) / max(now - last_log_time, 1e-9),
            "loss_d": loss_d.item(), "loss_g": loss_g.item(),
            "d_real": float(d_real.mean()), "d_fake": float(d_fake.mean()),
            "d_real_min": float(d_real.min()), "d_fake_max": float(d_fake.max()),
        }
        metrics |= spectral_metrics(discriminator)
        watch.check_steps(monitor)
        metrics |= input_gradient_norms(discriminator, real, "grad_x_real")
        metrics |= input_gradient_norms(discriminator, fake, "grad_x_fake")
        watch.check_logging_step(iteration, grad_norm_d=float(grad_norm_d),
                                 d_real_min=metrics["d_real_min"], d_fake_max=metrics["d_fake_max"])
        if watch.stop_event is None and (last or iteration % cfg.eval_every == 0):
            metrics |= evaluate(iteration)
            objective = metrics[cfg.primary_metric]
            if not math.isfinite(objective):  # a recorded-only blow-up: the objective stays finite
                objective = cfg.divergence.diverged_objective
            metrics["objective"] = objective

        stop = watch.stop_event
        metrics["diverged"] = int(stop is not None)
        if stop is not None or last:
            if stop is not None or objective is None:
                objective = cfg.divergence.diverged_objective
            metrics |= {
                "done": 1, "objective": objective,
                "divergence_cause": stop.cause if stop else "",
                "divergence_step": stop.iteration if stop else -1, "events": len(watch.events),
            }
            metrics = finite_only(metrics)
            write_events()
            report(metrics, save_checkpoint(iteration, summary=metrics))
            return metrics

        if watch.events:
            write_events()
        checkpoint = save_checkpoint(iteration) if iteration % cfg.checkpoint_every == 0 else None
        report(finite_only(metrics), checkpoint)
        # it/s counts training only: evaluation, checkpoint and report time are left out of the next window
        last_log_time, last_log_iteration = time.perf_counter(), iteration
    raise AssertionError("unreachable: the last iteration returns")  # pragma: no cover


def finite_only(metrics: dict[str, Any]) -> dict[str, Any]:
    """Drop non-finite numbers: NaN and inf break ASHA and Optuna. The events log keeps what they were."""
    return {key: value for key, value in metrics.items()
            if not isinstance(value, float) or math.isfinite(value)}
