"""The tidy tables of a study, as written to Parquet: column names, Arrow types and meaning.

A study collected by `analysis.collect` becomes four tables, one Parquet file each (`<name>.parquet`):

- `trials`: one row per trial (an MLflow child run). The fixed columns below, then one column per flattened
  TrialConfig key exactly as the study logged it as a param (`g_lr`, `variant`, `seed`,
  `divergence.grad_explosion`, ...), typed from TrialConfig's defaults (float, int, bool, else string).
- `evals`: one row per trial x evaluation (the steps at which `objective` or a metric was logged).
- `events`: one row per divergence event read from the trial's `events.json` artifact.
- `diagnostics`: one row per trial x diagnostic key x logged iteration (sigma, gradient norms, losses,
  D outputs), downsampled by MLflow to at most `max_points` iterations per trial and key (first and last
  always kept).

Iterations count generator updates. Metric values are in the metric's own units (FID and the digits Frechet
distance: lower is better; IS: higher is better; KID: lower is better). A value never logged is NaN
(floats) or null (other types). Each file's Arrow schema metadata carries the study's metadata (`study`,
`parent_run_id`, `tracking_uri`, `study_status`, `axes`, `metric`, `collected_at`) as UTF-8 strings.
"""

from __future__ import annotations

import pyarrow as pa

TRIAL_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "run_id": (pa.string(), "MLflow run id of the trial (child run)"),
    "trial_id": (pa.string(), "Ray Tune's trial id (tag trial_id)"),
    "cell": (pa.string(), "stable key of the trial's axes except seed (tag cell)"),
    "status": (
        pa.string(),
        "finished / diverged / failed / running (tag status; else from the MLflow run state)",
    ),
    "outcome": (
        pa.string(),
        "stable / diverged / collapsed / no_learning / failed, or running while it has none (tag outcome; "
        "study.layout.outcome; README: Outcomes)",
    ),
    "complete": (pa.bool_(), "True when status is finished or diverged: the trial's outcome is known"),
    "mlflow_status": (pa.string(), "MLflow run state: RUNNING, FINISHED, FAILED, KILLED, SCHEDULED"),
    "diverged": (pa.bool_(), "the trial stopped on a divergence (tag diverged == '1')"),
    "divergence_cause": (pa.string(), "one of trainables.config.DIVERGENCE_CAUSES, '' when none"),
    "divergence_step": (pa.int64(), "generator iteration of the divergence, -1 when none"),
    "events": (
        pa.int64(),
        "number of recorded divergence events (final report's `events`), -1 if not reported",
    ),
    "last_iteration": (
        pa.int64(),
        "last generator iteration reported (latest `iteration` metric), -1 if none",
    ),
    "metric": (pa.string(), "name of the primary metric: fd_digits, fid or kid"),
    "final_metric": (pa.float64(), "primary metric at the last evaluation"),
    "best_metric": (pa.float64(), "lowest primary metric over the evaluations"),
    "best_metric_iteration": (pa.int64(), "iteration of best_metric, -1 when never evaluated"),
    "final_objective": (
        pa.float64(),
        "objective at the last evaluation (the divergence penalty once diverged)",
    ),
    "final_is": (pa.float64(), "Inception Score at the last evaluation"),
    "best_is": (pa.float64(), "highest Inception Score over the evaluations"),
    "final_kid": (pa.float64(), "KID at the last evaluation"),
    "best_kid": (pa.float64(), "lowest KID over the evaluations"),
    "n_evals": (pa.int64(), "number of evaluations that logged the primary metric"),
    "start_time": (pa.timestamp("ms", tz="UTC"), "MLflow run start"),
    "end_time": (pa.timestamp("ms", tz="UTC"), "MLflow run end, null while running"),
    "wall_time_s": (pa.float64(), "end_time - start_time in seconds, NaN while running"),
    "setting": (
        pa.string(),
        "Miyato et al.'s setting A-F matched by (g_lr, d_lr, beta1, beta2, n_dis), else ''",
    ),
}

EVAL_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "run_id": (pa.string(), "MLflow run id of the trial"),
    "iteration": (pa.int64(), "generator iteration of the evaluation (the MLflow step)"),
    "objective": (pa.float64(), "objective to minimise (the divergence penalty once diverged)"),
    "metric": (pa.float64(), "value of the trial's primary metric (trials.metric) at this evaluation"),
    "fd_digits": (pa.float64(), "Frechet distance of the built-in digits feature extractor"),
    "fid": (pa.float64(), "FID (torch-fidelity, TF-exact Inception)"),
    "is": (pa.float64(), "Inception Score"),
    "kid": (pa.float64(), "Kernel Inception Distance"),
}

EVENT_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "run_id": (pa.string(), "MLflow run id of the trial"),
    "cause": (pa.string(), "divergence cause, one of trainables.config.DIVERGENCE_CAUSES"),
    "iteration": (pa.int64(), "generator iteration at which the event was detected"),
    "action": (pa.string(), "stop or record (the cause's policy)"),
    "values": (pa.string(), "JSON object: the watched quantities at the event"),
    "thresholds": (pa.string(), "JSON object: the thresholds they crossed"),
}

DIAGNOSTIC_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "run_id": (pa.string(), "MLflow run id of the trial"),
    "key": (pa.string(), "the MLflow metric key, e.g. sigma/blocks.0 or grad_norm/D/blocks.0"),
    "quantity": (
        pa.string(),
        "sigma, sigma_out, sigma_in, sigma_conv, gamma, grad_norm, grad_x_real, grad_x_fake, loss_d, loss_g, "
        "d_real, d_fake, or the theory panel's sigma_raw, sigma_eff, weight_std and weight_std_pred",
    ),
    "network": (pa.string(), "D or G for grad_norm, else ''"),
    "layer": (pa.string(), "module path (blocks.0), or mean/min/max for grad_x_*, '' for totals and losses"),
    "iteration": (pa.int64(), "generator iteration (the MLflow step)"),
    "value": (pa.float64(), "the logged value (sigma: largest singular value; norms: L2; weight_std: std)"),
}

TABLES: dict[str, dict[str, tuple[pa.DataType, str]]] = {
    "trials": TRIAL_COLUMNS,
    "evals": EVAL_COLUMNS,
    "events": EVENT_COLUMNS,
    "diagnostics": DIAGNOSTIC_COLUMNS,
}

# Keys of evaluation reports that become evals columns; every other numeric key of interest is a diagnostic.
EVAL_METRICS = ("objective", "fd_digits", "fid", "is", "kid")
DIAGNOSTIC_PREFIXES = (
    "sigma/",
    "sigma_out/",
    "sigma_in/",
    "sigma_conv/",
    "sigma_raw/",
    "sigma_eff/",
    "weight_std/",
    "weight_std_pred/",
    "gamma/",
    "grad_norm/",
    "grad_x_real/",
    "grad_x_fake/",
)
DIAGNOSTIC_KEYS = ("loss_d", "loss_g", "d_real", "d_fake")


def arrow_schema(
    columns: dict[str, tuple[pa.DataType, str]], metadata: dict[str, str] | None = None
) -> pa.Schema:
    """An Arrow schema whose fields carry their meaning as field metadata (`doc`)."""
    fields = [pa.field(name, dtype, metadata={"doc": doc}) for name, (dtype, doc) in columns.items()]
    return pa.schema(fields, metadata=metadata)
