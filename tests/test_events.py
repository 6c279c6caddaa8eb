"""The divergence watch on its own: exact causes, steps and values, and a state round trip."""

import math

import torch

from trainables.config import DivergenceConfig
from trainables.events import DivergenceWatch, StepMonitor


def feed(monitor: StepMonitor, rows: list[tuple[float, float, float, float]]) -> None:
    """Each row is one iteration: (D loss, D grad norm, G loss, G grad norm), D step first."""
    for iteration, (loss_d, grad_d, loss_g, grad_g) in enumerate(rows, start=1):
        monitor.update(iteration, torch.tensor(loss_d), torch.tensor(grad_d))
        monitor.update(iteration, torch.tensor(loss_g), torch.tensor(grad_g))


def test_step_monitor_keeps_the_first_iteration_of_each_cause_in_order():
    monitor = StepMonitor(explosion_threshold=100.0, device=torch.device("cpu"))
    feed(monitor, [(1, 1, 1, 1), (1, 500, 1, 1), (1, 900, 1, 1), (1, math.inf, 1, 1), (math.nan, 1, 1, 1)])
    explosion, nonfinite_grad, nonfinite_loss = monitor.read()
    assert explosion == ("grad_explosion", 2, 500.0)
    assert nonfinite_grad == ("nonfinite_grad", 4, math.inf)
    assert nonfinite_loss[:2] == ("nonfinite_loss", 5) and math.isnan(nonfinite_loss[2])


def test_within_an_iteration_the_d_gradient_comes_before_the_g_loss_it_poisons():
    monitor = StepMonitor(explosion_threshold=100.0, device=torch.device("cpu"))
    feed(monitor, [(1, 1, 1, 1), (1, math.nan, math.nan, math.nan)])
    assert [cause for cause, _, _ in monitor.read()] == ["nonfinite_grad", "nonfinite_loss"]


def test_watch_records_each_cause_once_with_its_policy():
    watch = DivergenceWatch(DivergenceConfig(policy={"grad_explosion": "record"}))
    monitor = StepMonitor(explosion_threshold=10.0, device=torch.device("cpu"))
    feed(monitor, [(1, 50, 1, 1), (1, 60, 1, 1)])
    watch.check_steps(monitor)
    watch.check_steps(monitor)
    assert [(e.cause, e.iteration, e.action) for e in watch.events] == [("grad_explosion", 1, "record")]
    assert watch.events[0].values == {"grad_norm": 50.0}
    assert watch.stop_event is None


def test_grad_vanishing_needs_patience_consecutive_logging_steps():
    watch = DivergenceWatch(DivergenceConfig(grad_vanishing=1e-3, grad_vanishing_patience=3))
    for iteration, grad in [(10, 0.0), (20, 0.0), (30, 1.0), (40, 0.0), (50, 1e-4), (60, 0.0)]:
        watch.check_logging_step(iteration, grad_norm_d=grad, d_real_min=0.0, d_fake_max=1.0)
    assert [(e.cause, e.iteration) for e in watch.events] == [("grad_vanishing", 60)]
    assert watch.stop_event.cause == "grad_vanishing"


def test_d_saturation_is_recorded_when_real_and_fake_separate_for_patience_steps():
    watch = DivergenceWatch(DivergenceConfig(d_saturation_patience=2))
    watch.check_logging_step(1, grad_norm_d=1.0, d_real_min=2.0, d_fake_max=-1.0)
    assert watch.events == []
    watch.check_logging_step(2, grad_norm_d=1.0, d_real_min=0.5, d_fake_max=0.2)
    (event,) = watch.events
    assert (event.cause, event.iteration, event.action) == ("d_saturation", 2, "record")
    assert event.values == {"d_real_min": 0.5, "d_fake_max": 0.2}


def test_fid_blowup_after_warmup_relative_to_best_and_above_cap():
    watch = DivergenceWatch(DivergenceConfig(fid_blowup_factor=2.0, fid_blowup_warmup_evals=1))
    watch.check_evaluation(100, "fid", 500.0, None)  # warm-up: never a blow-up
    watch.check_evaluation(200, "fid", 40.0, None)
    watch.check_evaluation(300, "fid", 79.0, None)
    assert watch.events == []
    watch.check_evaluation(400, "fid", 81.0, None)
    assert [(e.cause, e.iteration, e.values) for e in watch.events] == [
        ("fid_blowup", 400, {"fid": 81.0, "best_fid": 40.0})]
    capped = DivergenceWatch(DivergenceConfig(fid_blowup_cap=30.0, fid_blowup_warmup_evals=0))
    capped.check_evaluation(100, "fd_digits", 31.0, None)
    assert capped.events[0].thresholds["cap"] == 30.0


def test_nonfinite_metric_is_a_blowup_even_during_warmup():
    watch = DivergenceWatch(DivergenceConfig(fid_blowup_warmup_evals=5))
    watch.check_evaluation(100, "fid", math.nan, None)
    assert watch.events[0].cause == "fid_blowup"
    assert watch.events[0].values["fid"] == "nan"


def test_mode_collapse_only_when_enabled():
    off = DivergenceWatch(DivergenceConfig())
    off.check_evaluation(100, "fid", 10.0, 0.0)
    assert off.events == []
    on = DivergenceWatch(DivergenceConfig(mode_collapse=0.05))
    on.check_evaluation(100, "fid", 10.0, 0.01)
    assert [(e.cause, e.action) for e in on.events] == [("mode_collapse", "record")]


def test_watch_state_round_trip_continues_the_streaks():
    config = DivergenceConfig(grad_vanishing=1e-3, grad_vanishing_patience=2)
    watch = DivergenceWatch(config)
    watch.check_evaluation(100, "fid", 10.0, None)
    watch.check_logging_step(100, grad_norm_d=0.0, d_real_min=0.0, d_fake_max=1.0)
    restored = DivergenceWatch(config)
    restored.load_state_dict(watch.state_dict())
    restored.check_logging_step(200, grad_norm_d=0.0, d_real_min=0.0, d_fake_max=1.0)
    assert [(e.cause, e.iteration) for e in restored.events] == [("grad_vanishing", 200)]
    assert restored.best_metric == 10.0
