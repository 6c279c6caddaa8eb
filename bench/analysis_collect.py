"""Benchmark: collect a 1,000-trial x 40-evaluation study from a local MLflow server into Parquet
(goal <= 30 s), then build its report (goal <= 20 s).

    .venv/bin/python bench/analysis_collect.py [--trials 1000] [--evals 40] [--tracking-uri URI]

Without --tracking-uri it starts its own `mlflow server` (sqlite backend, 1 worker) in a temporary folder on
127.0.0.1 and writes the synthetic study through MlflowClient first (not timed). Prints one line per phase.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from analysis.collect import collect
from analysis.report import write_report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the synthetic study is test code
from synthetic_study import SyntheticTrial, write_study

AXES = ["g_lr", "beta1", "variant", "seed"]
G_LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3)
BETA1S = (0.0, 0.3, 0.5, 0.9)
VARIANTS = ("none", "sn", "ssn", "bsn", "bssn")
LAYERS = ("blocks.0", "blocks.1", "blocks.2", "blocks.3")
# Diagnostics logged at each evaluation: 40 points per trial and key, like the evaluations.
CONFIG = {"log_every": 500, "eval_every": 500, "iterations": 20_000}


def synthetic_trials(n_trials: int, n_evals: int, seed: int = 0) -> list[SyntheticTrial]:
    """A grid over g_lr x beta1 x variant with as many seeds as n_trials allows; divergence grows with lr."""
    rng = np.random.default_rng(seed)
    cells = [(g, b, v) for g in G_LRS for b in BETA1S for v in VARIANTS]
    trials = []
    for index in range(n_trials):
        g_lr, beta1, variant = cells[index % len(cells)]
        steps = [500 * (i + 1) for i in range(n_evals)]
        base = 20 + 3000 * g_lr + 10 * beta1 + rng.normal(0, 2)
        curve = [(s, float(base + 200 * np.exp(-s / 3000))) for s in steps]
        risk = 0.05 + 150 * g_lr * (1.5 if variant == "none" else 1.0) + 0.3 * (beta1 == 0.9)
        diverged = rng.random() < risk
        extra = {}
        if diverged:
            step = int(rng.choice(steps[1:]))
            curve = [(s, v) for s, v in curve if s < step]
            extra = {
                "status": "diverged",
                "divergence_cause": "grad_explosion",
                "divergence_step": step,
                "events": [
                    {
                        "cause": "grad_explosion",
                        "iteration": step,
                        "values": {"grad_norm/D": 2e4},
                        "thresholds": {"grad_explosion": 1e4},
                        "action": "stop",
                    }
                ],
            }
        diagnostics = {
            f"sigma/{layer}": [(s, 1.0 + 0.01 * k) for s, _ in curve] for k, layer in enumerate(LAYERS)
        }
        diagnostics["grad_norm/D"] = [(s, 0.5 + 1e-5 * s) for s, _ in curve]
        diagnostics["grad_norm/G"] = [(s, 0.7) for s, _ in curve]
        trials.append(
            SyntheticTrial(
                axes={"g_lr": g_lr, "beta1": beta1, "variant": variant, "seed": index // len(cells)},
                evals=curve,
                diagnostics=diagnostics,
                config=CONFIG,
                **extra,
            )
        )
    return trials


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=open(root / "server.log", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return proc, uri
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--evals", type=int, default=40)
    parser.add_argument("--tracking-uri", default=None, help="an existing server (default: start one)")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        proc = None
        if args.tracking_uri:
            uri = args.tracking_uri
        else:
            proc, uri = start_server(root)
        try:
            study = f"bench-{args.trials}x{args.evals}-{int(time.time())}"
            started = time.perf_counter()
            write_study(
                MlflowClient(uri), study, synthetic_trials(args.trials, args.evals), axes=AXES, workers=8
            )
            print(f"write (setup, not timed): {time.perf_counter() - started:.1f} s", flush=True)

            started = time.perf_counter()
            tables = collect(uri, study=study)
            tables.write_parquet(root / "out" / "tables")
            collect_s = time.perf_counter() - started
            print(
                f"collect + Parquet: {collect_s:.1f} s for {len(tables.trials)} trials, {len(tables.evals)} "
                f"evaluations, {len(tables.diagnostics)} diagnostic points, {len(tables.events)} events "
                f"(goal <= 30 s)",
                flush=True,
            )
            started = time.perf_counter()
            write_report(tables, root / "out")
            print(f"report: {time.perf_counter() - started:.1f} s (goal <= 20 s)", flush=True)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
