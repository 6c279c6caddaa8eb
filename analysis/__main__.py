"""Command line: `python -m analysis report|collect --study NAME|--run-id ID [--tracking-uri URI] [--out D]`.

`collect` writes the study's Parquet tables only; `report` writes tables, figures and report.html and logs
them to the study's parent run. Progress goes to stdout; the last line is the path written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import mlflow

from analysis.aggregate import AxisError
from analysis.collect import StudyLookupError, collect
from analysis.report import log_report, report_folder, write_report


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per artifact read
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("report", "tables, figures and the HTML report (logged to the parent run)"),
        ("collect", "the study's tidy tables as Parquet only"),
    ):
        command = commands.add_parser(name, help=text)
        which = command.add_mutually_exclusive_group(required=True)
        which.add_argument("--study", help="study name (the parent run's `study` tag)")
        which.add_argument("--run-id", help="the study's parent run id")
        command.add_argument(
            "--tracking-uri",
            default=None,
            help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's default)",
        )
        command.add_argument(
            "--out", type=Path, default=None, help="output folder (default: reports/<study>)"
        )
        command.add_argument("--no-log", action="store_true", help="report: do not log to the parent run")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = args.tracking_uri or mlflow.get_tracking_uri()
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    try:
        tables = collect(uri, study=args.study, run_id=args.run_id, progress=say)
        out = args.out or report_folder(tables.meta["study"])
        if args.command == "collect":
            tables.write_parquet(out / "tables")
            path = out / "tables"
        else:
            path = write_report(tables, out, progress=say)
            if not args.no_log:
                log_report(tables, uri, out, progress=say)
    except (StudyLookupError, AxisError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
