"""Run one trial without Ray:

    python -m trainables [--config FILE] [--set key=value ...] [--out DIR] [--resume]

With no arguments it trains the built-in digits on the CPU. Prints one progress line per logging step; writes
`metrics.jsonl`, `samples/*.png`, `events.json` and `checkpoint/` under the output folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from trainables.config import ConfigError, merge, parse_config, parse_overrides
from trainables.data import DatasetNotFoundError
from trainables.metrics import InceptionWeightsMissingError
from trainables.train import train
from trainables.trial import CHECKPOINT_FILE, CheckpointError


def print_progress(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
    parts = [f"iter {metrics['iteration']:>7}", f"{metrics['it_per_s']:7.1f} it/s"]
    parts += [f"{key} {metrics[key]:.4g}" for key in ("loss_d", "loss_g", "fd_digits", "fid", "is", "kid")
              if key in metrics]
    if metrics.get("done"):
        cause, step = metrics["divergence_cause"], metrics["divergence_step"]
        parts.append(f"done: {metrics['outcome']}" + (f" ({cause} at {step})" if cause else ""))
    print("  ".join(parts), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainables", description="Run one trial without Ray.")
    parser.add_argument("--config", type=Path, help="YAML file of trial config fields (trainables/config.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, dotted for nested ones (divergence.grad_explosion=1e3)")
    parser.add_argument("--out", type=Path, default=Path("runs/trial"),
                        help="output folder (default: runs/trial)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    args = parser.parse_args(argv)

    try:
        values = yaml.safe_load(args.config.read_text()) if args.config else {}
        if not isinstance(values, dict | None):
            raise ConfigError(f"--config {args.config}: expected a mapping of config fields")
        config = parse_config(merge(values or {}, parse_overrides(args.overrides)))
        resume_from = args.out / "checkpoint" if args.resume else None
        if resume_from is not None and not (resume_from / CHECKPOINT_FILE).is_file():
            raise ConfigError(f"--resume: no checkpoint at {resume_from / CHECKPOINT_FILE}")
    except (ConfigError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    metrics_path = args.out / "metrics.jsonl"
    if not args.resume:
        metrics_path.unlink(missing_ok=True)  # a new run in an old folder starts a new log

    def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        with metrics_path.open("a") as log:  # opened per report: nothing is written before training starts
            log.write(json.dumps(metrics) + "\n")
        print_progress(metrics, checkpoint_dir)

    print(f"training {config.variant} on {config.dataset} ({config.resolution} px) for {config.iterations} "
          f"iterations; output in {args.out}", flush=True)
    try:
        summary = train(config, report, workdir=args.out, resume_from=resume_from)
    except (ConfigError, DatasetNotFoundError, InceptionWeightsMissingError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({key: summary[key] for key in ("outcome", "objective", "diverged", "divergence_cause",
                                                    "divergence_step")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
