"""The trial end to end on the built-in digits, on CPU: exact resume, reports, and each divergence cause
provoked for real, with its exact cause and step."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import float64_trials

import trainables.trial as trial_module
from trainables.config import ConfigError, DivergenceConfig
from trainables.data import BatchSampler
from trainables.train import train
from trainables.trial import CHECKPOINT_FILE

# Small enough for two CPU cores; evaluation only where a test needs it.
TINY = {
    "width": 0.125, "batch_size": 8, "z_dim": 16, "iterations": 40, "log_every": 5, "eval_every": 1000,
    "checkpoint_every": 1000, "eval_generated": 64, "eval_real": 64,
}


class Recorder:
    """The `report` callable: keeps every report and the checkpoint folders it was given."""

    def __init__(self):
        self.reports: list[dict] = []
        self.checkpoints: list[str | None] = []

    def __call__(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        self.reports.append(dict(metrics))
        self.checkpoints.append(checkpoint_dir)


def run(tmp_path, name="trial", **overrides):
    recorder = Recorder()
    summary = train(TINY | overrides, recorder, workdir=tmp_path / name)
    return summary, recorder


def assert_all_reported_values_finite(recorder: Recorder) -> None:
    for metrics in recorder.reports:
        for key, value in metrics.items():
            assert isinstance(value, str) or math.isfinite(value), (key, value)


def weights(path) -> dict[str, torch.Tensor]:
    state = torch.load(path / "checkpoint" / CHECKPOINT_FILE, weights_only=True)
    return {f"G.{k}": v for k, v in state["generator"].items()} | {
        f"D.{k}": v for k, v in state["discriminator"].items()}


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    config = TINY | {"iterations": 2000, "log_every": 500, "checkpoint_every": 1000, "eval_every": 2000}
    straight = Recorder()
    train(config, straight, workdir=tmp_path / "straight")

    interrupted = Recorder()

    class Interrupt(Exception):
        pass

    def stop_after_checkpoint(metrics, checkpoint_dir=None):
        interrupted(metrics, checkpoint_dir)
        if checkpoint_dir is not None:
            raise Interrupt  # the process dies right after its checkpoint at 1k iterations

    with pytest.raises(Interrupt):
        train(config, stop_after_checkpoint, workdir=tmp_path / "resumed")
    assert interrupted.reports[-1]["iteration"] == 1000
    resumed = Recorder()
    train(config, resumed, workdir=tmp_path / "resumed", resume_from=tmp_path / "resumed" / "checkpoint")

    assert [r["iteration"] for r in resumed.reports] == [1500, 2000]
    expected, actual = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert resumed.reports[-1]["objective"] == straight.reports[-1]["objective"]
    assert resumed.reports[-1]["loss_d"] == straight.reports[-1]["loss_d"]


def test_reports_follow_the_schedule_and_the_contract(tmp_path):
    summary, recorder = run(tmp_path, iterations=20, log_every=5, eval_every=10, checkpoint_every=10)
    assert [r["iteration"] for r in recorder.reports] == [5, 10, 15, 20]
    assert [c is not None for c in recorder.checkpoints] == [False, True, False, True]
    assert ["objective" in r for r in recorder.reports] == [False, True, False, True]
    log = recorder.reports[0]
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm/D", "grad_norm/G",
                "grad_x_real/mean", "grad_x_real/min", "grad_x_real/max", "grad_x_fake/mean", "it_per_s"):
        assert key in log, key
    assert any(key.startswith("sigma/") for key in log)
    assert any(key.startswith("grad_norm/D/") for key in log)
    assert any(key.startswith("grad_norm/G/") for key in log)
    evaluation = recorder.reports[1]
    assert evaluation["objective"] == evaluation["fd_digits"]
    assert any(key.startswith("sigma_conv/") for key in evaluation)
    assert summary == recorder.reports[-1]
    ending = ("done", "diverged", "divergence_cause", "divergence_step")
    assert tuple(summary[key] for key in ending) == (1, 0, "", -1)
    assert sorted(p.name for p in (tmp_path / "trial" / "samples").iterdir()) == [
        "iter_0000010.png", "iter_0000020.png"]
    # A 20-iteration G is near-constant at its judged evaluation: a recorded mode collapse, nothing stops;
    # it has not yet beaten a constant generator, so its outcome is no_learning, not collapsed.
    events = json.loads((tmp_path / "trial" / "events.json").read_text())
    assert [(e["cause"], e["action"]) for e in events] == [("mode_collapse", "record")]
    assert summary["outcome"] == "no_learning"
    assert_all_reported_values_finite(recorder)


def test_finished_trial_resumed_reports_its_result_without_training(tmp_path):
    summary, _ = run(tmp_path, iterations=10)
    again = Recorder()
    result = train(TINY | {"iterations": 10}, again, workdir=tmp_path / "trial",
                   resume_from=tmp_path / "trial" / "checkpoint")
    assert result == summary and again.reports == [summary]


def test_nan_in_a_batch_is_a_nonfinite_loss_at_that_iteration(tmp_path, monkeypatch):
    real_next = BatchSampler.next
    calls = {"n": 0}

    def next_with_nan(self):
        calls["n"] += 1
        batch = real_next(self)
        return batch * math.nan if calls["n"] == 13 else batch  # 13th batch at n_dis 2 -> iteration 7

    monkeypatch.setattr(BatchSampler, "next", next_with_nan)
    summary, recorder = run(tmp_path, n_dis=2, log_every=5)
    assert (summary["divergence_cause"], summary["divergence_step"], summary["diverged"]) == (
        "nonfinite_loss", 7, 1)
    assert summary["iteration"] == 10  # stopped at the next logging step
    assert summary["objective"] == 1e4 and summary["done"] == 1 and summary["outcome"] == "diverged"
    events = json.loads((tmp_path / "trial" / "events.json").read_text())
    # A NaN batch poisons the loss and, through it, the gradients of the same iteration: both are named.
    assert [(e["cause"], e["network"], e["iteration"], e["action"]) for e in events] == [
        ("nonfinite_loss", "D", 7, "stop"), ("nonfinite_grad", "D", 7, "stop"),
        ("nonfinite_loss", "G", 7, "stop"), ("nonfinite_grad", "G", 7, "stop")]
    assert events[0]["values"]["loss"] == "nan"
    assert_all_reported_values_finite(recorder)


def test_nonfinite_gradient_with_finite_loss_is_named_as_such(tmp_path, monkeypatch):
    build = trial_module.build_discriminator
    d_steps = {"n": 0}

    def poisoned_discriminator(*args, **kwargs):
        discriminator = build(*args, **kwargs)
        first_bias = next(p for name, p in discriminator.named_parameters() if name.endswith("bias"))

        def poison(grad):
            d_steps["n"] += 1
            return grad * math.inf if d_steps["n"] == 9 else grad  # the 9th D backward: iteration 9

        first_bias.register_hook(poison)
        return discriminator

    monkeypatch.setattr(trial_module, "build_discriminator", poisoned_discriminator)
    summary, _ = run(tmp_path, variant="none")
    assert (summary["divergence_cause"], summary["divergence_step"]) == ("nonfinite_grad", 9)


def test_huge_learning_rate_explodes_at_the_first_step_above_threshold_after_the_startup(tmp_path):
    # Without normalization, lr = 1 sends D's gradient norm to ~1e13 and keeps it there. It saturates G
    # too, whose gradient is then gone: recorded here, so that the explosion rule's own step is what stops.
    policy = DivergenceConfig().policy | {"grad_vanishing": "record"}
    summary, recorder = run(tmp_path, variant="none", g_lr=1.0, d_lr=1.0, log_every=1, iterations=40,
                            divergence={"policy": policy})
    assert summary["divergence_cause"] == "grad_explosion"
    crossed = next(r["iteration"] for r in recorder.reports
                   if r["iteration"] > 5 and r.get("grad_norm/D", 0.0) > 1e4)
    assert summary["divergence_step"] == crossed
    assert_all_reported_values_finite(recorder)


def zeroed(build):
    def build_zeroed(*args, **kwargs):
        module = build(*args, **kwargs)
        with torch.no_grad():
            for param in module.parameters():
                param.zero_()
        return module
    return build_zeroed


def test_zeroed_discriminator_is_grad_vanishing_after_patience_logging_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(trial_module, "build_discriminator", zeroed(trial_module.build_discriminator))
    # A zeroed D gives zero gradients to its own weights and, through its zero input gradient, to G's.
    summary, _ = run(tmp_path, variant="none", log_every=5, divergence={"grad_vanishing_patience": 3})
    assert (summary["divergence_cause"], summary["divergence_step"], summary["outcome"]) == (
        "grad_vanishing", 15, "diverged")


def test_metric_above_cap_is_a_blowup_at_that_evaluation(tmp_path):
    summary, _ = run(tmp_path, eval_every=10,
                     divergence={"fid_blowup_cap": 1e-6, "fid_blowup_warmup_evals": 1})
    assert (summary["divergence_cause"], summary["divergence_step"]) == ("fid_blowup", 20)


def test_constant_generator_is_mode_collapse_and_d_saturation(tmp_path, monkeypatch):
    monkeypatch.setattr(trial_module, "build_generator", zeroed(trial_module.build_generator))
    summary, recorder = run(tmp_path, variant="none", g_lr=1e-12, eval_every=20, iterations=40,
                            log_every=1, divergence={"mode_collapse": 1e-3, "mode_collapse_warmup_evals": 0,
                                                     "d_saturation_patience": 3})
    assert summary["diverged"] == 0  # both causes are recorded, not stopped, by default
    events = {e["cause"]: e for e in json.loads((tmp_path / "trial" / "events.json").read_text())}
    assert events["mode_collapse"]["iteration"] == 20
    assert events["mode_collapse"]["values"]["diversity"] < 1e-6
    separated = [r["iteration"] for r in recorder.reports if r["d_real_min"] > r["d_fake_max"]]
    streak_end = next(it for it in separated if {it - 1, it - 2} <= set(separated))
    assert events["d_saturation"]["iteration"] == streak_end


def test_bad_config_fails_before_training_naming_the_field(tmp_path):
    recorder = Recorder()
    with pytest.raises(ConfigError, match="n_dis"):
        train(TINY | {"n_dis": 0}, recorder, workdir=tmp_path / "bad")
    assert recorder.reports == [] and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_compiled_trial_matches_eager_training(tmp_path):
    # In float64: in float32 each step matches to ~1e-7, but Adam turns noise-level gradient components into
    # ±lr steps and this tiny GAN drifts apart by amounts that depend on the CPU's kernels. In float64 the
    # two agree to ~1e-15 over these iterations; a compiled D that overwrote u in its own graph (the wrong
    # gradient the read-only forward avoids) was 3e-2 off at iteration 1.
    config = {"variant": "sn", "iterations": 3, "n_dis": 2, "log_every": 1}
    with float64_trials():
        _, eager = run(tmp_path, "eager", **config)
        _, compiled = run(tmp_path, "compiled", compile=True, **config)
    assert [m["iteration"] for m in compiled.reports] == [m["iteration"] for m in eager.reports] == [1, 2, 3]
    keys = ["loss_d", "loss_g", "d_real", "d_fake"] + [key for key in eager.reports[-1]
                                                      if key.startswith(("sigma/", "grad_norm/"))]
    assert len(keys) > 4 + 7
    for fast, slow in zip(compiled.reports, eager.reports, strict=True):
        for key in keys:
            assert fast[key] == pytest.approx(slow[key], rel=1e-8, abs=1e-8), (fast["iteration"], key)
