"""The paper's theory beside what a study measured (Lin, Sekar, Fanti 2021; the quantities each trial logs
through trainables.diagnostics' theory panel):

- SN divides each layer's weight by σ of its (c_out, c_in·k·k) reshape, so its effective weights have std
  ≈ 1/(√fan_in + √fan_out) (`weight_std_pred`; LeCun-like) at every step of training: std / prediction ≈ 1
  throughout. `none` has no such control: its std, its σ and its gradients drift as it trains.
- The conv operator's σ (`sigma_conv`) exceeds the reshape's (`sigma_raw`), so strict SN, which divides by
  it, over-shrinks: its std / SN's prediction ≈ σ_raw / σ_conv < 1 and its gradients vanish.
- BSN's prediction is symmetric in c_in and c_out (Xavier-like); SSN and BSSN multiply it by c, as Kaiming's
  gain multiplies LeCun's std.

Each function returns the numbers a figure draws or a table shows. Trends pool every trial of a variant that
logged the quantity (stable or not: the theory holds for a step, whatever the outcome), as the median and
quartiles over trials at each logged iteration.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.collect import StudyTables

STD_RATIO, CONV_RATIO, GRAD_NORM = "std / prediction", "σ_conv / σ", "gradient norm"
# What the paper predicts of each variant's measurements (the theory table's `prediction` column).
PREDICTIONS = {
    "none": "no control: std / prediction, σ and the gradients drift as it trains",
    "sn": "std / prediction ≈ 1 throughout (LeCun-like); σ_eff ≈ 1",
    "ssn": "std / prediction ≈ 1 with the prediction × c (c as Kaiming's gain); σ_eff ≈ c",
    "bsn": "std / prediction ≈ 1 with BSN's prediction, symmetric in c_in and c_out (Xavier-like)",
    "bssn": "std / prediction ≈ 1 with BSN's prediction × c (c as a gain)",
    "strict_sn": "over-shrinks: std / SN's prediction ≈ σ_raw / σ_conv < 1; smaller (vanishing) gradients",
    "sn_gamma_shared": "std / prediction ≈ 1 with the prediction × the learned γ",
    "sn_gamma_layer": "std / prediction ≈ 1 with the prediction × each layer's learned γ",
    "weight_norm": "not SN: held to SN's prediction for comparison",
    "layer_norm": "not SN: held to SN's prediction for comparison",
    "batch_norm": "not SN: held to SN's prediction for comparison",
}
TREND_COLUMNS = ["variant", "layer", "iteration", "median", "low", "high", "n_trials"]


def _wide(tables: StudyTables, quantities: list[str], network: str = "") -> pd.DataFrame:
    """Rows (run_id, layer, iteration) with one column per quantity, and the trial's variant."""
    diag = tables.diagnostics
    rows = diag[diag["quantity"].isin(quantities) & (diag["network"] == network) & (diag["layer"] != "")]
    wide = rows.pivot_table(index=["run_id", "layer", "iteration"], columns="quantity", values="value",
                            aggfunc="last").reset_index()
    wide.columns.name = None
    for quantity in quantities:
        if quantity not in wide:
            wide[quantity] = np.nan
    variants = tables.trials.set_index("run_id")["variant"] if "variant" in tables.trials else None
    wide["variant"] = wide["run_id"].map(variants) if variants is not None else ""
    return wide


def _trend(values: pd.DataFrame, column: str) -> pd.DataFrame:
    """Median and quartiles of `column` over trials per (variant, layer, iteration)."""
    finite = values[np.isfinite(pd.to_numeric(values[column]))] if len(values) else values
    if finite.empty:
        return pd.DataFrame(columns=TREND_COLUMNS)
    grouped = finite.groupby(["variant", "layer", "iteration"])[column]
    out = grouped.agg(median="median", low=lambda v: v.quantile(0.25), high=lambda v: v.quantile(0.75),
                      n_trials="count").reset_index()
    return out[TREND_COLUMNS]


def std_ratio_trends(tables: StudyTables) -> pd.DataFrame:
    """weight_std / weight_std_pred per variant, D layer and logged iteration (TREND_COLUMNS)."""
    wide = _wide(tables, ["weight_std", "weight_std_pred"])
    wide["ratio"] = wide["weight_std"] / wide["weight_std_pred"]
    return _trend(wide, "ratio")


def _conv_ratios(tables: StudyTables) -> pd.DataFrame:
    """Rows (run_id, layer, iteration, variant, ratio): sigma_conv at each evaluation over sigma_raw at the
    latest logging step up to it (the same step, unless the collector sampled it away). Linear layers, whose
    ratio is 1 by definition, are left out."""
    conv = _wide(tables, ["sigma_conv"]).dropna(subset=["sigma_conv"])
    raw = _wide(tables, ["sigma_raw"]).dropna(subset=["sigma_raw"])
    if conv.empty or raw.empty:
        return pd.DataFrame(columns=["run_id", "layer", "iteration", "variant", "ratio"])
    merged = pd.merge_asof(conv.sort_values("iteration"), raw[["run_id", "layer", "iteration", "sigma_raw"]]
                           .sort_values("iteration"), on="iteration", by=["run_id", "layer"])
    merged["ratio"] = merged["sigma_conv"] / merged["sigma_raw"]
    merged = merged[np.isfinite(merged["ratio"]) & ~np.isclose(merged["ratio"], 1.0, rtol=1e-6)]
    return merged[["run_id", "layer", "iteration", "variant", "ratio"]]


def conv_ratio_trends(tables: StudyTables) -> pd.DataFrame:
    """sigma_conv / sigma_raw per variant, D conv layer and evaluation (TREND_COLUMNS)."""
    return _trend(_conv_ratios(tables), "ratio")


def gradient_trends(tables: StudyTables, network: str) -> pd.DataFrame:
    """grad_norm/<network>/<layer> per variant, layer and logged iteration; network "D" or "G"."""
    wide = _wide(tables, ["grad_norm"], network=network)
    return _trend(wide, "grad_norm")


def theory_table(tables: StudyTables) -> pd.DataFrame:
    """One row per variant (and c, where the study swept it): the paper's prediction beside the measurement at
    the first and the last logged iteration of each trial, as medians over the trials and D layers.

    Columns: variant, [scale], prediction, n_trials, std_ratio_first, std_ratio_last (weight_std /
    weight_std_pred), sigma_eff_last, sigma_in_over_out (σ₂ / σ₁ of the raw weight, SN family: how far the
    two reshapes BSN averages differ), conv_over_reshape_last (sigma_conv / sigma_raw, conv layers, last
    evaluation), grad_d_first, grad_d_last, grad_g_last (per-layer gradient norms)."""
    trials = tables.trials
    keys = ["variant"] + (["scale"] if "scale" in trials and trials["scale"].nunique() > 1 else [])
    wide = _wide(tables, ["weight_std", "weight_std_pred", "sigma_eff", "sigma_in", "sigma_out"])
    wide["std_ratio"] = wide["weight_std"] / wide["weight_std_pred"]
    wide["in_over_out"] = wide["sigma_in"] / wide["sigma_out"]
    grads = {network: _wide(tables, ["grad_norm"], network=network) for network in ("D", "G")}

    def per_trial(frame: pd.DataFrame, column: str, which: str) -> pd.Series:
        """Each trial's median over layers of `column` at its first or last iteration with a value."""
        frame = frame.dropna(subset=[column])
        if frame.empty:
            return pd.Series(dtype=float)
        at = frame.groupby("run_id")["iteration"].transform("min" if which == "first" else "max")
        return frame[frame["iteration"] == at].groupby("run_id")[column].median()

    measured = pd.DataFrame({
        "std_ratio_first": per_trial(wide, "std_ratio", "first"),
        "std_ratio_last": per_trial(wide, "std_ratio", "last"),
        "sigma_eff_last": per_trial(wide, "sigma_eff", "last"),
        "sigma_in_over_out": per_trial(wide, "in_over_out", "last"),
        "conv_over_reshape_last": per_trial(_conv_ratios(tables), "ratio", "last"),
        "grad_d_first": per_trial(grads["D"], "grad_norm", "first"),
        "grad_d_last": per_trial(grads["D"], "grad_norm", "last"),
        "grad_g_last": per_trial(grads["G"], "grad_norm", "last"),
    })
    columns = keys + ["prediction", "n_trials", *measured.columns]
    if measured.empty or "variant" not in trials:
        return pd.DataFrame(columns=columns)
    joined = trials.set_index("run_id")[keys].join(measured, how="inner")
    table = joined.groupby(keys, sort=True).median().reset_index()
    table.insert(len(keys), "n_trials", joined.groupby(keys, sort=True).size().to_numpy())
    table.insert(len(keys), "prediction", table["variant"].map(PREDICTIONS).fillna(""))
    return table[columns]
