"""The divergence detector and the outcome rules, against a labelled corpus of short real runs (issue 12).

Each case is one real trial (train(), standard CNN at width 0.125, 200 iterations, fd_digits every 50) on one
of three datasets built here: the built-in digits; load_digits upscaled to 28 px and written as MNIST's idx
files (read by the `mnist` loader, as bench/startup_spike.py writes them); a colour imagefolder of 64 px
patches of scikit-learn's two sample photos (PNG files, resized to 32 px by the loader). Each case produces
its condition for real: learning rates, betas and variants, a batch of NaN (non-finite) at one iteration, a
D gradient x1e6 at one step (a spike), a generator that sees one latent from some iteration on (collapse after
learning), a generator that is one trained image or one trained colour whatever its latent (collapse from
the start), a generator that never trains.

Each case's label (LABELS) is what a person judged from the run's sample grids and metric curve, with the
reason, looking at the whole run: `--record DIR` runs every case with the bssn-paper presets' policy (every
cause recorded, so nothing stops but a non-finite value) and writes each run's grids side by side
(DIR/<case>.png) and its curves (DIR/<case>.txt), then the same matrix for that policy. The
labels use the outcome names (README, Outcomes): stable (healthy: varied samples that look like the data),
diverged (exploded and never recovered, or non-finite), collapsed (learned, then one repeated glyph or a flat
field), no_learning (never better than the untrained generator's noise or blobs).

    python bench/detector.py                  # every case with the default rules: confusion matrix, P/R
    python bench/detector.py --record DIR     # the runs a person labels from: only non-finite values stop
    python bench/detector.py --only digits/sn_lr1e-3 mnist/nan_batch   # some cases
    python bench/detector.py --jobs 1         # one case at a time (default: 2 processes, 1 thread each)

Goal (issue 12): divergence precision and recall >= 0.95, no healthy run stopped, no collapsed or flat-field
run called stable.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup_spike import write_mnist  # noqa: E402

import trainables.trial as trial_module  # noqa: E402
from trainables.config import DIVERGENCE_CAUSES, TRIAL_OUTCOMES  # noqa: E402
from trainables.data import BatchSampler  # noqa: E402
from trainables.metrics.fd_digits import load_or_train_classifier  # noqa: E402
from trainables.train import train  # noqa: E402

DATASETS = ("digits", "mnist", "photos")
BASE = {"width": 0.125, "batch_size": 32, "iterations": 200, "log_every": 20, "eval_every": 50,
        "checkpoint_every": 200, "eval_generated": 300, "eval_real": 300, "metrics": ["fd_digits"],
        "device": "cpu"}
PATCH, STRIDE = 64, 24  # photo patches (px) and their stride: 2 photos x 16 x 25 = 800 images
# --record: the bssn-paper presets' policy, every cause recorded but non-finite values (nothing to see after)
RECORD = {"policy": {cause: "stop" if cause.startswith("nonfinite") else "record"
                     for cause in DIVERGENCE_CAUSES}}


@dataclass(frozen=True)
class Case:
    """One run of the corpus: a config (over BASE) and a condition produced during training."""

    name: str
    config: dict[str, Any]
    condition: str = ""  # "", nan_batch, grad_spike, single_latent, constant_image, flat_field
    at: int = 0  # the iteration the condition starts (nan_batch, grad_spike, single_latent)


LR3 = {"g_lr": 1e-3, "d_lr": 1e-3}
CASES = (
    Case("sn_lr1e-3", {"variant": "sn"} | LR3),
    Case("sn_lr1e-3_beta0", {"variant": "sn", "beta1": 0.0, "seed": 1} | LR3),
    Case("bssn_lr1e-3", {"variant": "bssn", "scale": 1.5} | LR3),
    Case("grad_spike", {"variant": "sn"} | LR3, "grad_spike", 120),
    Case("sn_lr2e-4", {"variant": "sn", "g_lr": 2e-4, "d_lr": 2e-4}),
    Case("frozen_generator", {"variant": "sn", "g_lr": 1e-9, "d_lr": 1e-3}),
    Case("bssn_lr1e-2_beta0", {"variant": "bssn", "scale": 1.5, "g_lr": 1e-2, "d_lr": 1e-2, "beta1": 0.0,
                               "seed": 1}),
    Case("none_lr1e-3", {"variant": "none", "seed": 2} | LR3),
    Case("none_lr1", {"variant": "none", "g_lr": 1.0, "d_lr": 1.0}),
    Case("nan_batch", {"variant": "sn"} | LR3, "nan_batch", 120),
    Case("nan_batch_bssn", {"variant": "bssn", "scale": 1.5} | LR3, "nan_batch", 150),
    Case("single_latent", {"variant": "sn"} | LR3, "single_latent", 160),  # after the grid at 150
    Case("single_latent_none", {"variant": "none", "seed": 2} | LR3, "single_latent", 120),
    Case("constant_image", {"variant": "sn", "g_lr": 2e-2, "d_lr": 1e-3}, "constant_image"),
    Case("flat_field", {"variant": "sn"} | LR3, "flat_field"),
)

# What a person judged from each run's grids and curves (--record), and why; fd_digits levels of a
# constant generator: digits 1329, mnist 1268, photos 1791. Grids at iterations 50, 100, 150, 200. Judged on
# the runs of the official power-iteration order (trainables/normalization.py), 2026-12-02.
LABELS: dict[str, tuple[str, str]] = {
    "digits/sn_lr1e-3": ("stable", "varied digit-like glyphs at 150 and 200; fd 868 -> 230"),
    "digits/sn_lr1e-3_beta0": ("stable", "varied, legible digits (0, 2, 3, 5, 9, ...) at 200; fd 583 -> 120"),
    "digits/bssn_lr1e-3": ("stable", "varied digits (0, 2, 3, 5, 8, ...) at 150 and 200; fd 1533 -> 281"),
    "digits/grad_spike": ("stable", "D's spike at 120 passes; varied digits at 150 and 200, fd 868 -> 194"),
    "digits/sn_lr2e-4": ("no_learning", "grey texture, then small repeated green and red marks; fd 1510 -> "
                                        "1572"),
    "digits/frozen_generator": ("no_learning", "the untrained generator's grey texture at every grid"),
    "digits/bssn_lr1e-2_beta0": ("no_learning", "dark smudges, pink streaks, then one repeated vertical "
                                                "stroke at 150 and 200: never a digit (fd 1161 -> 1590)"),
    "digits/none_lr1e-3": ("no_learning", "blue blobs at 50, then stripes fading to a near-black field; "
                                          "never a digit; D separates every batch from 40 on"),
    "digits/none_lr1": ("diverged", "D's loss 5.6e13 and gradient 2e13 at 20; from then every gradient is "
                                    "exactly 0 and G paints one black field: exploded, never recovered"),
    "digits/nan_batch": ("diverged", "NaN losses from the NaN batch at 120 on"),
    "digits/nan_batch_bssn": ("diverged", "NaN losses from the NaN batch at 150 on"),
    "digits/single_latent": ("collapsed", "varied digit-like glyphs at 150 (fd 406), one repeated image at "
                                          "200"),
    "digits/single_latent_none": ("no_learning", "blobs and stripes, never a digit, then one black image "
                                                 "from 150"),
    "digits/constant_image": ("no_learning", "one repeated blurred stroke from the first grid: never varied"),
    "digits/flat_field": ("no_learning", "a flat grey-green field at every grid"),
    "mnist/sn_lr1e-3": ("stable", "varied strokes at 150 and 200, alike but not one glyph: young (fd 1228 -> "
                                  "434 -> 543)"),
    "mnist/sn_lr1e-3_beta0": ("stable", "varied digits (2, 3, 5, 6, 9, ...) at 150 and 200; fd 996 -> 371"),
    "mnist/bssn_lr1e-3": ("stable", "varied digits from 100 on (2, 6, 7, 9, ...); fd 368 -> 248"),
    "mnist/grad_spike": ("stable", "D's spike at 120 passes; varied strokes at 150 and 200, fd 434 -> 585"),
    "mnist/sn_lr2e-4": ("no_learning", "textures, dark blobs on lilac at 150, brown textures at 200; no "
                                       "digit (fd 1458 -> 838 -> 1265)"),
    "mnist/frozen_generator": ("no_learning", "the untrained generator's texture at every grid"),
    "mnist/bssn_lr1e-2_beta0": ("no_learning", "one repeated vertical bar, then faint vertical stripes; fd "
                                               "1415 -> 1374"),
    "mnist/none_lr1e-3": ("stable", "green tiles, cyan dashes at 100, varied stroke shapes at 150 and 200; "
                                    "fd 2600 -> 557"),
    "mnist/none_lr1": ("diverged", "every gradient exactly 0 from 20 on, after the first steps' spike "
                                   "saturated G: one black field at every grid, the run is dead"),
    "mnist/nan_batch": ("diverged", "NaN losses from the NaN batch at 120 on"),
    "mnist/nan_batch_bssn": ("diverged", "NaN losses from the NaN batch at 150 on"),
    "mnist/single_latent": ("collapsed", "varied strokes at 150 (fd 444), one repeated image at 200"),
    "mnist/single_latent_none": ("no_learning", "textures, cyan dashes at 100 (no digit yet), then one "
                                                "repeated image"),
    "mnist/constant_image": ("no_learning", "one repeated grey blob from the first grid: never varied"),
    "mnist/flat_field": ("no_learning", "a flat field at every grid"),
    "photos/sn_lr1e-3": ("no_learning", "near-uniform grey, green, then teal fields; fd 2353 -> 2788"),
    "photos/sn_lr1e-3_beta0": ("stable", "varied dark and sand-coloured blocks, then teal, sand and green "
                                         "patches at 150 and 200 (fd 2376 -> 729 -> 994): young, not one "
                                         "image"),
    "photos/bssn_lr1e-3": ("no_learning", "near-uniform green, then teal fields; fd 2172 to 3099"),
    "photos/grad_spike": ("no_learning", "the sn run's near-uniform grey, green and teal fields; fd 2353 -> "
                                         "2897"),
    "photos/sn_lr2e-4": ("no_learning", "uniform grey-green, teal, then brown textures; fd 1883 -> 2140"),
    "photos/frozen_generator": ("no_learning", "the untrained generator's texture at every grid"),
    "photos/bssn_lr1e-2_beta0": ("no_learning", "purple, then brown and olive textured fields: nothing like "
                                                "the photos (fd 2415 -> 2862)"),
    "photos/none_lr1e-3": ("stable", "varied light and dark blocks in the photos' white, dark and brown "
                                     "tones from 50 on; fd 451 -> 713"),
    "photos/none_lr1": ("diverged", "D's gradient 1e13-7e14 from 6 to the end; G one flat field throughout"),
    "photos/nan_batch": ("diverged", "NaN losses from the NaN batch at 120 on"),
    "photos/nan_batch_bssn": ("diverged", "NaN losses from the NaN batch at 150 on"),
    "photos/single_latent": ("no_learning", "near-uniform textures to 150, then one repeated image"),
    "photos/single_latent_none": ("collapsed", "varied light and dark blocks at 50 and 100 (fd 451), one "
                                               "repeated red image at 150 and 200"),
    "photos/constant_image": ("no_learning", "one repeated textured image at every grid: never varied"),
    "photos/flat_field": ("no_learning", "one flat colour at every grid"),
}


# ---- the datasets ----------------------------------------------------------------------------------------

def write_photos(root: Path) -> None:
    """64 px patches of scikit-learn's two sample photos (china, flower) as PNGs: root/<photo>/<n>.png."""
    for name, photo in zip(("china", "flower"), load_sample_images().images, strict=True):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        height, width, _ = photo.shape
        corners = [(y, x) for y in range(0, height - PATCH + 1, STRIDE)
                   for x in range(0, width - PATCH + 1, STRIDE)]
        for n, (y, x) in enumerate(corners):
            Image.fromarray(photo[y:y + PATCH, x:x + PATCH]).save(folder / f"{n:04d}.png")


def dataset_config(dataset: str, data: Path) -> dict[str, Any]:
    if dataset == "digits":
        return {"dataset": "digits"}
    if dataset == "mnist":
        return {"dataset": "mnist", "data_root": str(data / "mnist")}
    return {"dataset": "imagefolder", "data_root": str(data / "photos")}


# ---- the conditions --------------------------------------------------------------------------------------

class ConditionClock:
    """The generator iteration, counted from the sampler's batches (n_dis per iteration)."""

    def __init__(self, n_dis: int):
        self.n_dis, self.batches = n_dis, 0

    @property
    def iteration(self) -> int:
        return self.batches // self.n_dis + 1  # the iteration of the batch being drawn


def sampler_with(condition: str, at: int, clock: ConditionClock) -> type[BatchSampler]:
    """A BatchSampler that counts the iterations, and whose batch at iteration `at` is all NaN (nan_batch)."""

    class ConditionSampler(BatchSampler):
        def next(self) -> torch.Tensor:
            batch = super().next()
            iteration = clock.iteration
            clock.batches += 1
            if condition == "nan_batch" and iteration == at and clock.batches % clock.n_dis == 0:
                return batch * math.nan  # the iteration's last D step
            return batch

    return ConditionSampler


def spiked(discriminator: nn.Module, at: int) -> nn.Module:
    """D whose first weight's gradient is x1e6 at its `at`-th backward (D steps only: the G step's backward
    leaves D's weights without gradients): one step's spike, as a bad batch could give."""
    backwards = [0]

    def spike(grad: torch.Tensor) -> torch.Tensor:
        backwards[0] += 1
        return grad * 1e6 if backwards[0] == at else grad

    next(p for p in discriminator.parameters() if p.requires_grad).register_hook(spike)
    return discriminator


class SingleLatent(nn.Module):
    """A generator that maps every latent of a batch to the batch's first from iteration `at` on."""

    def __init__(self, generator: nn.Module, at: int, clock: ConditionClock):
        super().__init__()
        self.generator, self.at, self.clock = generator, at, clock

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.clock.iteration > self.at:
            z = z[:1].expand_as(z)
        return self.generator(z)


class ConstantImage(nn.Module):
    """A generator whose output is one trained image (flat: one trained colour), whatever its latent."""

    def __init__(self, resolution: int, flat: bool):
        super().__init__()
        size = 1 if flat else resolution
        self.resolution = resolution
        start = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        self.image = nn.Parameter(start * 0.1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        image = torch.tanh(self.image).expand(z.shape[0], 3, self.resolution, self.resolution)
        return image + 0 * z.sum(1).view(-1, 1, 1, 1)  # keeps the latent's device and graph


def apply_condition(case: Case) -> None:
    """Patch the trial's builders for this process (one case per process)."""
    clock = ConditionClock(case.config.get("n_dis", 1))
    trial_module.BatchSampler = sampler_with(case.condition, case.at, clock)
    build = trial_module.build_generator
    if case.condition == "grad_spike":
        build_d = trial_module.build_discriminator
        trial_module.build_discriminator = lambda *a, **k: spiked(build_d(*a, **k), case.at)
    elif case.condition == "single_latent":
        trial_module.build_generator = lambda *a, **k: SingleLatent(build(*a, **k), case.at, clock)
    elif case.condition in ("constant_image", "flat_field"):
        trial_module.build_generator = lambda arch, resolution, **k: ConstantImage(
            resolution, flat=case.condition == "flat_field")


# ---- one run ---------------------------------------------------------------------------------------------

def run_case(dataset: str, case: Case, data: Path, out: Path, record: bool) -> dict[str, Any]:
    torch.set_num_threads(1)
    apply_condition(case)
    config = BASE | dataset_config(dataset, data) | case.config | {"cache_dir": str(data / "cache")}
    if record:
        config["divergence"] = RECORD
    reports: list[dict[str, Any]] = []
    workdir = out / f"{dataset}_{case.name}"
    started = time.perf_counter()
    summary = train(config, lambda metrics, checkpoint: reports.append(metrics), workdir=workdir)
    events = json.loads((workdir / "events.json").read_text()) if (workdir / "events.json").exists() else []
    evals = [(r["iteration"], r["fd_digits"], r.get("diversity_ratio", math.nan),
              r.get("class_coverage", math.nan))
             for r in reports if "fd_digits" in r]
    grads = [(r["iteration"], r.get("grad_norm/D", math.nan), r.get("grad_norm/G", math.nan), r["loss_d"])
             for r in reports if "loss_d" in r]
    return {"dataset": dataset, "case": case.name, "outcome": summary["outcome"],
            "stopped": bool(summary["diverged"]), "cause": summary["divergence_cause"],
            "step": summary["divergence_step"],
            "iteration": summary["iteration"],
            "events": [(e["cause"], e["network"], e["iteration"], e["action"]) for e in events],
            "evals": evals, "grads": grads, "seconds": time.perf_counter() - started,
            "samples": sorted(str(p) for p in (workdir / "samples").glob("iter_*.png"))}


def contact_sheet(result: dict[str, Any], path: Path) -> None:
    """The run's sample grids side by side, for the person who labels it."""
    grids = [Image.open(p).convert("RGB") for p in result["samples"]]
    if not grids:
        return
    width = sum(g.width for g in grids) + 4 * (len(grids) - 1)
    sheet = Image.new("RGB", (width, max(g.height for g in grids)), "white")
    x = 0
    for grid in grids:
        sheet.paste(grid, (x, 0))
        x += grid.width + 4
    sheet.save(path)


def describe(result: dict[str, Any]) -> str:
    lines = [f"{result['dataset']}/{result['case']}: {result['outcome']} {result['cause']} "
             f"step {result['step']} (ended at {result['iteration']}, {result['seconds']:.0f} s)"]
    lines += [f"  eval {it:4d}: fd_digits {fd:8.1f}  diversity {div:.2f}  classes {cov:.2f}"
              for it, fd, div, cov in result["evals"]]
    lines += [f"  log {it:4d}: |grad D| {gd:10.3g}  |grad G| {gg:10.3g}  loss_d {ld:.3g}"
              for it, gd, gg, ld in result["grads"]]
    lines += [f"  event {event}" for event in result["events"]]
    return "\n".join(lines)


# ---- the matrix ------------------------------------------------------------------------------------------

def confusion(results: list[dict[str, Any]]) -> str:
    """Rows: the person's label; columns: the detector's outcome; then precision and recall per class."""
    classes = list(TRIAL_OUTCOMES)
    counts = Counter((LABELS[f"{r['dataset']}/{r['case']}"][0], r["outcome"]) for r in results)
    width = max(len(c) for c in classes) + 2
    lines = ["label \\ detector".ljust(18) + "".join(c.rjust(width) for c in classes) + "   total"]
    for label in classes:
        row = [counts[(label, outcome)] for outcome in classes]
        lines.append(label.ljust(18) + "".join(str(n).rjust(width) for n in row) + f"{sum(row):8d}")
    lines.append("")
    for name in classes:
        predicted = sum(counts[(label, name)] for label in classes)
        actual = sum(counts[(name, outcome)] for outcome in classes)
        hit = counts[(name, name)]
        precision = f"{hit / predicted:.2f}" if predicted else "  - "
        recall = f"{hit / actual:.2f}" if actual else "  - "
        lines.append(f"{name:12s} precision {precision} ({hit}/{predicted})  "
                     f"recall {recall} ({hit}/{actual})")
    return "\n".join(lines)


def goals(results: list[dict[str, Any]]) -> list[str]:
    """The issue's goals, each with whether it is met."""
    labels = {f"{r['dataset']}/{r['case']}": LABELS[f"{r['dataset']}/{r['case']}"][0] for r in results}
    key = {f"{r['dataset']}/{r['case']}": r for r in results}
    diverged_true = [k for k, label in labels.items() if label == "diverged"]
    diverged_said = [k for k, r in key.items() if r["outcome"] == "diverged"]
    hits = len(set(diverged_true) & set(diverged_said))
    precision = hits / len(diverged_said) if diverged_said else math.nan
    recall = hits / len(diverged_true) if diverged_true else math.nan
    stopped_healthy = [k for k, label in labels.items() if label == "stable" and key[k]["stopped"]]
    collapsed_stable = [k for k, label in labels.items()
                        if label in ("collapsed", "no_learning") and key[k]["outcome"] == "stable"]
    return [
        f"divergence precision {precision:.2f}, recall {recall:.2f} (goal >= 0.95): "
        f"{'met' if precision >= 0.95 and recall >= 0.95 else 'MISSED'}",
        f"healthy runs stopped: {len(stopped_healthy)} {stopped_healthy or ''}",
        f"collapsed, flat-field or never-learning runs called stable: {len(collapsed_stable)} "
        f"{collapsed_stable or ''}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", type=Path, metavar="DIR",
                        help="record every cause, stop nothing; write grids and curves under DIR to label "
                        "from")
    parser.add_argument("--only", nargs="+", metavar="DATASET/CASE", help="run only these cases")
    parser.add_argument("--jobs", type=int, default=2, help="processes at once (1 thread each)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    args = parser.parse_args()

    runs = [(dataset, case) for dataset in args.datasets for case in CASES
            if not args.only or f"{dataset}/{case.name}" in args.only]
    with tempfile.TemporaryDirectory(prefix="detector-bench-") as tmp:
        data = Path(tmp) / "data"
        write_mnist(data / "mnist")
        write_photos(data / "photos")
        out = Path(tmp) / "runs"
        load_or_train_classifier(data / "cache")  # once, before the processes that all read it
        started = time.perf_counter()
        context = multiprocessing.get_context("spawn")  # each case patches its own process's trial builders
        with ProcessPoolExecutor(args.jobs, mp_context=context, max_tasks_per_child=1) as pool:
            futures = [pool.submit(run_case, dataset, case, data, out, args.record is not None)
                       for dataset, case in runs]
            results = []
            for future in futures:
                result = future.result()
                results.append(result)
                print(describe(result) if args.record else
                      f"{result['dataset']}/{result['case']}: {result['outcome']} {result['cause']} "
                      f"{result['step'] if result['cause'] else ''}  (label: "
                      f"{LABELS.get(result['dataset'] + '/' + result['case'], ('?',))[0]})", flush=True)
                if args.record:
                    args.record.mkdir(parents=True, exist_ok=True)
                    name = f"{result['dataset']}_{result['case']}"
                    contact_sheet(result, args.record / f"{name}.png")
                    (args.record / f"{name}.txt").write_text(describe(result) + "\n")
        print(f"{len(results)} runs in {time.perf_counter() - started:.0f} s ({args.jobs} processes)")
    labelled = [r for r in results if f"{r['dataset']}/{r['case']}" in LABELS]
    if labelled:
        policy = ("the bssn-paper presets' policy (record all but non-finite)" if args.record
                  else "default policies")
        print(f"\n{len(labelled)} labelled runs, {policy}:\n{confusion(labelled)}\n"
              + "\n".join(goals(labelled)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
