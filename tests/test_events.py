"""The divergence rules (trainables/events.py): per-step causes on the device, for one trial and a pack, the
logging-step and evaluation causes, the windows a config may set, and the trials they judge."""

from __future__ import annotations

import json
import math
import re
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, load_sample_images

from trainables.config import ConfigError, DivergenceConfig, parse_config
from trainables.data import load_images
from trainables.diagnostics import DiversityProbe
from trainables.events import DivergenceWatch, StepMonitor, parameter_norms, stacked_parameter_norms

CPU = torch.device("cpu")
DEFAULTS = DivergenceConfig()
LAYERS = {"D": ["blocks.conv1", "blocks.conv1", "head", "head"], "G": ["project", "to_rgb"]}
# The reported start-up spike, as reproduced (bench/startup_spike.py: MNIST-format digits, standard CNN width
# 0.125, bssn c = 1.5, lr 1e-2, beta1 0, seed 1): total gradient norms of the first iterations, D then G.
STARTUP_SPIKE = [(52.5, 5.61e5), (1.37e5, 40.1), (16.9, 3.19), (13.5, 2.23), (13.0, 1.6), (11.2, 1.08),
                 (11.0, 0.601), (11.4, 0.532), (11.8, 0.991), (12.5, 1.54)]


def feed(monitor: StepMonitor, rows, start: int = 1, layer_norms: dict | None = None) -> None:
    """Each row is one iteration: (D grad norm, G grad norm) or (D loss, D grad, G loss, G grad); D first."""
    for iteration, row in enumerate(rows, start=start):
        loss_d, grad_d, loss_g, grad_g = row if len(row) == 4 else (1.0, row[0], 1.0, row[1])
        norms = layer_norms or {}
        monitor.update(iteration, "D", torch.tensor(loss_d), torch.tensor(grad_d), norms.get("D"))
        monitor.update(iteration, "G", torch.tensor(loss_g), torch.tensor(grad_g), norms.get("G"))


def judged(rows, config: DivergenceConfig = DEFAULTS, **kwargs) -> DivergenceWatch:
    monitor = StepMonitor(config, CPU, **kwargs)
    feed(monitor, rows)
    watch = DivergenceWatch(config)
    watch.check_steps(monitor)
    return watch


def summary(watch: DivergenceWatch) -> list[tuple]:
    return [(e.cause, e.network, e.iteration, e.action) for e in watch.events]


# ---- per-step causes ------------------------------------------------------------------------------

def test_startup_spike_that_recovers_is_a_grad_spike_per_network_and_never_stops():
    watch = judged(STARTUP_SPIKE + [(12.0, 2.0)] * 30)
    assert sorted(summary(watch)) == [("grad_spike", "D", 2, "record"), ("grad_spike", "G", 1, "record")]
    assert watch.stop_event is None
    spike_g = next(e for e in watch.events if e.network == "G")
    assert spike_g.values == {"grad_norm": pytest.approx(5.61e5)}
    assert spike_g.thresholds == {"grad_norm": 1e4, "recovery": 5}


def test_sustained_explosion_stops_at_the_first_iteration_of_its_episode():
    healthy, exploding = [(12.0, 2.0)] * 10, [(5e6, 2.0)] * 25
    watch = judged(healthy + exploding)
    assert summary(watch) == [("grad_explosion", "D", 11, "stop")]
    (event,) = watch.events
    assert event.values == {"grad_norm": 5e6}
    assert event.thresholds == {"grad_norm": 1e4, "recovery": 5, "patience": 20}
    # Confirmed only once the episode has lasted the patience: one iteration less, and it is not yet.
    assert judged(healthy + exploding[:19]).events == []


def test_explosion_from_the_first_iteration_opens_its_episode_when_the_startup_ends():
    watch = judged([(1.0, 5e6)] * 30)
    assert summary(watch) == [("grad_spike", "G", 1, "record"), ("grad_explosion", "G", 6, "stop")]


def test_a_norm_that_dips_under_threshold_but_never_stays_there_is_an_explosion():
    flapping = [(5e6 if i % 3 == 0 else 10.0, 2.0) for i in range(30)]
    watch = judged([(10.0, 2.0)] * 10 + flapping)
    assert summary(watch) == [("grad_explosion", "D", 11, "stop")]


def test_threshold_is_the_floor_or_factor_times_the_runs_own_median_whichever_is_higher():
    # A network whose healthy norm is 500: 2e4 is over the 1e4 floor but under 100 x its median, so it is
    # this run's normal variation; 1e6 is over both.
    steady = [(500.0, 2.0)] * 20
    assert judged(steady + [(2e4, 2.0)] * 25).events == []
    assert summary(judged(steady + [(1e6, 2.0)] * 25)) == [("grad_explosion", "D", 21, "stop")]
    floor_only = DivergenceConfig(grad_explosion_factor=None)
    assert summary(judged(steady + [(2e4, 2.0)] * 25, floor_only)) == [("grad_explosion", "D", 21, "stop")]


def test_nonfinite_loss_and_gradient_are_found_at_once_with_network_layer_and_step():
    nan, inf = math.nan, math.inf
    layer_norms = {"D": torch.tensor([1.0, inf, 1.0, 1.0]), "G": torch.tensor([1.0, 1.0])}
    monitor = StepMonitor(DEFAULTS, CPU, layers=LAYERS)
    feed(monitor, [(1, 1, 1, 1)] * 3)
    feed(monitor, [(1, inf, nan, 1)], start=4, layer_norms=layer_norms)
    watch = DivergenceWatch(DEFAULTS)
    watch.check_steps(monitor)
    assert [(e.cause, e.network, e.layer, e.iteration, e.action) for e in watch.events] == [
        ("nonfinite_grad", "D", "blocks.conv1", 4, "stop"), ("nonfinite_loss", "G", None, 4, "stop")]
    assert watch.events[0].values == {"grad_norm": "inf"} and watch.events[1].values == {"loss": "nan"}


def test_an_explosion_names_the_layer_with_the_largest_gradient():
    monitor = StepMonitor(DEFAULTS, CPU, layers=LAYERS)
    feed(monitor, [(10.0, 2.0)] * 10)
    norms = {"D": torch.tensor([1.0, 1.0, 5e6, 3.0]), "G": torch.tensor([1.0, 1.0])}
    feed(monitor, [(5e6, 2.0)] * 25, start=11, layer_norms=norms)
    watch = DivergenceWatch(DEFAULTS)
    watch.check_steps(monitor)
    assert [(e.cause, e.network, e.layer) for e in watch.events] == [("grad_explosion", "D", "head")]


def test_within_an_iteration_the_d_gradient_comes_before_the_g_loss_it_poisons():
    watch = judged([(1, 1, 1, 1), (1, math.nan, math.nan, math.nan)])
    assert [(e.cause, e.network) for e in watch.events] == [
        ("nonfinite_grad", "D"), ("nonfinite_loss", "G"), ("nonfinite_grad", "G")]


def test_parameter_norms_give_get_total_norm_exactly():
    grads = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape
             in enumerate([(16, 3, 3, 3), (16,), (1, 64), (1,)])]
    assert torch.equal(torch.linalg.vector_norm(parameter_norms(grads)), torch.nn.utils.get_total_norm(grads))
    flat = torch.stack([torch.cat([g.flatten() for g in grads]), torch.cat([2 * g.flatten() for g in grads])])
    per_member = stacked_parameter_norms(flat, [g.numel() for g in grads])
    torch.testing.assert_close(per_member, torch.stack([parameter_norms(grads), 2 * parameter_norms(grads)]))


def test_a_stacked_monitor_is_its_members_each_alone_before_and_after_a_member_leaves():
    quick = DivergenceConfig(grad_explosion_patience=8, grad_explosion_recovery=2, grad_explosion_startup=0)
    configs = [DEFAULTS, DivergenceConfig(grad_explosion=50.0, grad_explosion_median_steps=16), quick]
    rng = np.random.default_rng(0)
    rows = [[(float(a), float(b), float(c), float(d)) for a, b, c, d in
             zip(rng.random(60), np.exp(rng.normal(3, 3, 60)), rng.random(60), np.exp(rng.normal(2, 3, 60)),
                 strict=True)] for _ in configs]
    rows[1][40] = (math.nan, 1.0, 1.0, 1.0)
    rows[2][35:50] = [(1.0, 5e6, 1.0, 2.0)] * 15  # an explosion of member 2 (patience 8), after the keep
    singles = [StepMonitor(config, CPU, layers=LAYERS) for config in configs]
    stacked = StepMonitor.stack([StepMonitor(config, CPU, layers=LAYERS) for config in configs])
    for it in range(60):
        for k, single in enumerate(singles):
            feed(single, [rows[k][it]], start=it + 1)
        members = list(range(len(configs))) if it < 30 else [0, 2]
        if it == 30:
            stacked.keep(torch.tensor(members))
        for network, loss_column in (("D", 0), ("G", 2)):
            loss = torch.tensor([rows[k][it][loss_column] for k in members])
            grad = torch.tensor([rows[k][it][loss_column + 1] for k in members])
            stacked.update(it + 1, network, loss, grad)
        if it in (29, 59):
            for row, k in enumerate(members):
                assert stacked.member(row).read() == singles[k].read(), (it, k)
                mine, theirs = stacked.member(row).state_dict(), singles[k].state_dict()
                for key, value in theirs.items():
                    torch.testing.assert_close(torch.as_tensor(mine[key]), torch.as_tensor(value), rtol=0,
                                               atol=0, equal_nan=True, msg=key)
    found = {(k, f.cause) for k in range(3) for f in singles[k].read()}
    assert {(1, "nonfinite_loss"), (2, "grad_explosion"), (0, "grad_spike")} <= found


def test_a_monitor_restored_mid_episode_continues_exactly():
    rows = [(10.0, 2.0)] * 10 + [(5e6, 2.0)] * 12 + [(10.0, 2.0)] * 2 + [(5e6, 2.0)] * 12
    straight = StepMonitor(DEFAULTS, CPU)
    feed(straight, rows)
    first = StepMonitor(DEFAULTS, CPU)
    feed(first, rows[:15])
    resumed = StepMonitor(DEFAULTS, CPU)
    resumed.load_state_dict(first.state_dict())
    feed(resumed, rows[15:], start=16)
    assert resumed.read() == straight.read() and [f.cause for f in straight.read()] == ["grad_explosion"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is only observable on CUDA")
def test_update_never_synchronises_with_the_host_alone_or_stacked():
    cuda = torch.device("cuda")
    single = StepMonitor(DEFAULTS, cuda, layers=LAYERS)
    stacked = StepMonitor.stack([StepMonitor(DEFAULTS, cuda, layers=LAYERS) for _ in range(3)])
    inputs = {shape: (torch.ones(shape, device=cuda), torch.full(shape, 1e5, device=cuda))
              for shape in ((), (3,))}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for iteration in range(1, 40):
            for network, size in (("D", 4), ("G", 2)):
                single.update(iteration, network, *inputs[()], torch.ones(size, device=cuda))
                stacked.update(iteration, network, *inputs[(3,)], torch.ones(3, size, device=cuda))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    spikes_then_explosions = ["grad_spike", "grad_spike", "grad_explosion", "grad_explosion"]
    assert [f.cause for f in single.read()] == spikes_then_explosions
    assert [f.cause for f in stacked.member(2).read()] == spikes_then_explosions


# ---- logging-step and evaluation causes ----------------------------------------------------------

def test_grad_vanishing_is_gs_gradient_gone_at_patience_consecutive_logging_steps():
    watch = DivergenceWatch(DivergenceConfig(grad_vanishing=1e-3, grad_vanishing_patience=3))
    # D still trains (a G frozen by saturation leaves D a gradient): G's gradient alone decides
    for iteration, grad in [(10, 0.0), (20, 0.0), (30, 1.0), (40, 0.0), (50, 1e-4), (60, 0.0)]:
        watch.check_logging_step(iteration, grad_norm_d=1.02, grad_norm_g=grad, d_real_min=0.0,
                                 d_fake_max=1.0)
    assert summary(watch) == [("grad_vanishing", "G", 60, "stop")]
    assert watch.events[0].values == {"grad_norm": 0.0, "grad_norm_d": 1.02}
    assert watch.events[0].thresholds == {"grad_norm": 1e-3, "patience": 3}
    # A hinge D's gradient is exactly 0 while it separates every batch; G still trains: no vanishing
    # (bench/detector.py: such runs learn once G catches up, or never learn and end no_learning).
    separated = DivergenceWatch(DivergenceConfig(grad_vanishing=1e-3, grad_vanishing_patience=3))
    for iteration in range(10, 110, 10):
        separated.check_logging_step(iteration, grad_norm_d=0.0, grad_norm_g=3.5, d_real_min=2.0,
                                     d_fake_max=-1.0)
    assert [e.cause for e in separated.events] == ["d_saturation"]


def test_d_saturation_is_recorded_when_real_and_fake_separate_for_patience_steps():
    watch = DivergenceWatch(DivergenceConfig(d_saturation_patience=2))
    watch.check_logging_step(1, grad_norm_d=1.0, grad_norm_g=1.0, d_real_min=2.0, d_fake_max=-1.0)
    assert watch.events == []
    watch.check_logging_step(2, grad_norm_d=1.0, grad_norm_g=1.0, d_real_min=0.5, d_fake_max=0.2)
    assert summary(watch) == [("d_saturation", "D", 2, "record")]
    assert watch.events[0].values == {"d_real_min": 0.5, "d_fake_max": 0.2, "margin": pytest.approx(0.3)}


def evaluate(watch: DivergenceWatch, values: list[float], every: int = 100, diversity=None) -> None:
    for n, value in enumerate(values, start=1):
        watch.check_evaluation(n * every, "fd_digits", value, diversity)


def test_fid_blowup_after_warmup_relative_to_best_and_above_cap():
    watch = DivergenceWatch(DivergenceConfig(fid_blowup_factor=2.0, fid_blowup_warmup_evals=1))
    evaluate(watch, [500.0, 40.0, 79.0])  # the first is warm-up: never a blow-up
    assert watch.events == []
    evaluate(watch, [81.0], every=400)
    assert summary(watch) == [("fid_blowup", "G", 400, "stop")]
    assert watch.events[0].values["fd_digits"] == 81.0 and watch.events[0].values["best_fd_digits"] == 40.0
    capped = DivergenceWatch(DivergenceConfig(fid_blowup_cap=30.0, fid_blowup_warmup_evals=0))
    evaluate(capped, [31.0])
    assert capped.events[0].thresholds["cap"] == 30.0


def test_fid_blowup_needs_patience_consecutive_evaluations_and_names_the_first():
    config = DivergenceConfig(fid_blowup_factor=2.0, fid_blowup_patience=2)
    recovered = DivergenceWatch(config)
    evaluate(recovered, [100.0, 40.0, 90.0, 45.0, 95.0])
    assert recovered.events == []
    sustained = DivergenceWatch(config)
    evaluate(sustained, [100.0, 40.0, 90.0, 95.0])
    assert summary(sustained) == [("fid_blowup", "G", 300, "stop")]


def test_a_run_that_never_got_good_is_no_learning_and_one_that_learned_then_fell_back_is_a_blowup():
    # The reported grey blobs: fd 674 -> 758, never below the best constant generator's 600: it never
    # learned, an outcome (no_learning), not a divergence.
    grey = DivergenceWatch(DEFAULTS, constant_level=600.0)
    evaluate(grey, [674.0, 758.0])
    assert grey.events == [] and (grey.learned, grey.outcome) == (False, "no_learning")
    # Below no_learning 0.55 x 600 = 330 once, then back at the constant level: it lost what it learned.
    fell_back = DivergenceWatch(DEFAULTS, constant_level=600.0)
    evaluate(fell_back, [700.0, 300.0, 650.0])  # 650 < 4 x 300: only the constant level catches it
    assert summary(fell_back) == [("fid_blowup", "G", 300, "stop")] and fell_back.outcome == "diverged"
    assert fell_back.events[0].thresholds["constant_level"] == 600.0
    young = DivergenceWatch(DEFAULTS, constant_level=600.0)
    evaluate(young, [1621.0, 1614.0, 1502.0, 300.0])  # a young run above the level at first, then learning
    assert young.events == [] and (young.learned, young.outcome) == (True, "stable")
    unknown_level = DivergenceWatch(DEFAULTS)
    evaluate(unknown_level, [674.0, 758.0])
    assert unknown_level.events == [] and (unknown_level.learned, unknown_level.outcome) == (None, "stable")


def test_nonfinite_metric_is_a_blowup_at_once_even_during_warmup():
    watch = DivergenceWatch(DivergenceConfig(fid_blowup_warmup_evals=5))
    evaluate(watch, [math.nan])
    assert summary(watch) == [("fid_blowup", "G", 100, "stop")]
    assert watch.events[0].values["fd_digits"] == "nan"


COLLAPSED = {"diversity": 0.01, "diversity_ratio": 0.02, "class_coverage": 0.1}
DIVERSE = {"diversity": 0.6, "diversity_ratio": 1.0, "class_coverage": 0.9}


def test_mode_collapse_is_on_by_default_after_the_warmup_and_reports_whether_it_holds_now():
    one_class = {"diversity": 0.4, "diversity_ratio": 0.69, "class_coverage": 0.15}
    watch = DivergenceWatch(DEFAULTS)
    evaluate(watch, [900.0], diversity=COLLAPSED)  # warm-up: an untrained G is near-constant
    assert watch.events == []
    watch.check_evaluation(200, "fd_digits", 800.0, one_class)  # varied pixels, one class: collapse too
    assert summary(watch) == [("mode_collapse", "G", 200, "record")] and watch.collapsed
    assert watch.events[0].values == one_class
    watch.check_evaluation(300, "fd_digits", 50.0, DIVERSE)
    assert not watch.collapsed and len(watch.events) == 1
    off = DivergenceWatch(DivergenceConfig(mode_collapse=None, mode_collapse_classes=None))
    evaluate(off, [1.0, 1.0], diversity=COLLAPSED)
    assert off.events == []


def test_a_metric_that_rose_with_a_collapse_is_the_collapse_not_a_blowup():
    # bench/detector.py's single_latent runs: fd_digits 466 -> 2148 (x4.6) when G's samples became one image.
    watch = DivergenceWatch(DEFAULTS, constant_level=1328.0)
    evaluate(watch, [1000.0, 466.0], diversity=DIVERSE)
    watch.check_evaluation(300, "fd_digits", 2148.0, COLLAPSED)
    assert summary(watch) == [("mode_collapse", "G", 300, "record")]
    assert (watch.stop_event, watch.outcome) == (None, "collapsed")
    varied = DivergenceWatch(DEFAULTS, constant_level=1328.0)  # the same rise with varied samples: a blow-up
    evaluate(varied, [1000.0, 466.0, 2148.0], diversity=DIVERSE)
    assert summary(varied) == [("fid_blowup", "G", 300, "stop")] and varied.outcome == "diverged"
    nonfinite = DivergenceWatch(DEFAULTS, constant_level=1328.0)  # a non-finite metric is judged whatever
    evaluate(nonfinite, [1000.0, 466.0], diversity=DIVERSE)
    nonfinite.check_evaluation(300, "fd_digits", math.nan, COLLAPSED)
    assert nonfinite.stop_event.cause == "fid_blowup" and nonfinite.outcome == "diverged"


def test_outcomes_of_constructed_runs():
    def outcome(values, diversities, config=DEFAULTS, level=1328.0) -> str:
        watch = DivergenceWatch(config, constant_level=level)
        for n, (value, diversity) in enumerate(zip(values, diversities, strict=True), start=1):
            watch.check_evaluation(100 * n, "fd_digits", value, diversity)
        return watch.outcome

    # learned (below 0.8 x 1328 = 1062) and varied at the end: stable, though its first grid was near-constant
    assert outcome([1500.0, 466.0, 440.0], [COLLAPSED, DIVERSE, DIVERSE]) == "stable"
    # collapsed at the second evaluation, varied again at the last: a transient, stable
    assert outcome([1000.0, 466.0, 900.0, 300.0], [DIVERSE, DIVERSE, COLLAPSED, DIVERSE]) == "stable"
    # learned, then one repeated image at the end: collapsed
    assert outcome([1000.0, 466.0, 2148.0], [DIVERSE, DIVERSE, COLLAPSED]) == "collapsed"
    # never better than a constant generator (a young G's sameness, a flat field, one glyph): no_learning
    assert outcome([1540.0, 1539.0, 1537.0], [COLLAPSED] * 3) == "no_learning"
    assert outcome([1540.0, 1100.0], [DIVERSE, DIVERSE]) == "no_learning"  # 1100 > 0.8 x 1328
    # no_learning off: the same run is judged by collapse alone
    assert outcome([1540.0, 1537.0], [COLLAPSED] * 2, DivergenceConfig(no_learning=None)) == "collapsed"
    # a stop on mode_collapse (by policy) is collapsed; a stop on anything else diverged, learned or not
    stop_collapse = DivergenceConfig(policy=DEFAULTS.policy | {"mode_collapse": "stop"})
    assert outcome([1000.0, 466.0, 2148.0], [DIVERSE, DIVERSE, COLLAPSED], stop_collapse) == "collapsed"
    stopped = DivergenceWatch(DEFAULTS, constant_level=1328.0)
    stopped.check_evaluation(100, "fd_digits", 466.0, DIVERSE)
    monitor = StepMonitor(DEFAULTS, CPU)
    feed(monitor, [(12.0, 2.0)] * 10 + [(1e6, 2.0)] * 30)
    stopped.check_steps(monitor)
    assert stopped.stop_event.cause == "grad_explosion" and stopped.outcome == "diverged"


def test_under_a_record_policy_a_divergence_that_never_recovered_is_diverged():
    # The bssn-paper presets record every cause but non-finite values: a run trains on to its last iteration.
    record = DivergenceConfig(policy={cause: "record" for cause in DEFAULTS.policy})

    def steps(rows) -> DivergenceWatch:
        watch = DivergenceWatch(record, constant_level=1328.0)
        watch.check_evaluation(100, "fd_digits", 466.0, DIVERSE)
        monitor = StepMonitor(record, CPU)
        feed(monitor, rows)
        watch.check_steps(monitor, iteration=len(rows))
        return watch

    still = steps([(12.0, 2.0)] * 10 + [(1e6, 2.0)] * 30)  # over threshold from iteration 11 to the end
    assert still.stop_event is None
    assert (still.outcome, still.divergence) == ("diverged", ("grad_explosion", 11))
    over = steps([(12.0, 2.0)] * 10 + [(1e6, 2.0)] * 30 + [(12.0, 2.0)] * 10)  # then back for 10 iterations
    assert "grad_explosion" in {e.cause for e in over.events}
    assert (over.outcome, over.divergence) == ("stable", None)

    blown = DivergenceWatch(record, constant_level=1328.0)
    evaluate(blown, [1000.0, 300.0, 1300.0], diversity=DIVERSE)  # over 4 x 300 at the last evaluation
    assert (blown.outcome, blown.divergence) == ("diverged", ("fid_blowup", 300))
    blown.check_evaluation(400, "fd_digits", 280.0, DIVERSE)  # and back: the blow-up is an event of the past
    assert (blown.outcome, blown.divergence) == ("stable", None)

    nonfinite = steps([(12.0, 2.0)] * 10 + [(1.0, math.nan, 1.0, 2.0)] + [(12.0, 2.0)] * 10)
    assert (nonfinite.outcome, nonfinite.divergence) == ("diverged", ("nonfinite_grad", 11))


def test_watch_state_round_trip_continues_the_streaks():
    config = DivergenceConfig(grad_vanishing=1e-3, grad_vanishing_patience=2, fid_blowup_patience=2)
    watch = DivergenceWatch(config)
    evaluate(watch, [100.0, 10.0, 50.0])
    watch.check_logging_step(300, grad_norm_d=0.0, grad_norm_g=0.0, d_real_min=0.0, d_fake_max=1.0)
    restored = DivergenceWatch(config)
    restored.load_state_dict(json.loads(json.dumps(watch.state_dict())))
    restored.check_logging_step(400, grad_norm_d=0.0, grad_norm_g=0.0, d_real_min=0.0, d_fake_max=1.0)
    restored.check_evaluation(400, "fd_digits", 60.0)
    assert summary(restored) == [("grad_vanishing", "G", 400, "stop"), ("fid_blowup", "G", 300, "stop")]
    assert restored.best_metric == 10.0


# ---- the windows a config may set ----------------------------------------------------------------

@pytest.mark.parametrize(("divergence", "field"), [
    ({"d_saturation_patience": 20}, "divergence.d_saturation_patience"),  # the report: 20 x 20 > 300
    ({"grad_vanishing_patience": 16}, "divergence.grad_vanishing_patience"),
    ({"grad_explosion_patience": 299},
     "divergence.grad_explosion_startup + divergence.grad_explosion_patience"),
    ({"fid_blowup_warmup_evals": 3}, "divergence.fid_blowup_warmup_evals + divergence.fid_blowup_patience"),
    ({"mode_collapse_patience": 4},
     "divergence.mode_collapse_warmup_evals + divergence.mode_collapse_patience"),
])
def test_a_window_longer_than_the_run_is_refused_naming_the_field(divergence, field):
    config = {"iterations": 300, "log_every": 20, "eval_every": 100, "divergence": divergence}
    with pytest.raises(ConfigError, match=rf"{re.escape(field)}: .* exceeds the run's"):
        parse_config(config)


def test_windows_that_fit_are_accepted_and_default_windows_a_short_run_cannot_hold_are_listed():
    fitting = parse_config({"iterations": 300, "log_every": 20, "eval_every": 100,
                            "divergence": {"d_saturation_patience": 15, "fid_blowup_patience": 2}})
    assert fitting.idle_detectors == []
    short = parse_config({"iterations": 10})  # a smoke run: accepted, and told what cannot fire
    assert [message.split(":")[0] for message in short.idle_detectors] == [
        "divergence.grad_vanishing_patience", "divergence.d_saturation_patience",
        "divergence.grad_explosion_startup + divergence.grad_explosion_patience",
        "divergence.fid_blowup_warmup_evals + divergence.fid_blowup_patience",
        "divergence.mode_collapse_warmup_evals + divergence.mode_collapse_patience"]
    assert parse_config(short.model_dump()) == short  # a checkpoint's config still loads


def test_a_spike_cannot_be_made_to_stop_and_recovery_must_fit_in_patience():
    with pytest.raises(ConfigError, match="grad_spike: a transient .* valid policy: record"):
        parse_config({"divergence": {"policy": {"grad_spike": "stop"}}})
    with pytest.raises(ConfigError, match="grad_explosion_recovery: 30 iterations exceeds grad_explosion_"):
        parse_config({"divergence": {"grad_explosion_recovery": 30}})


# ---- the mode-collapse threshold, calibrated -----------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    """MNIST's idx format: zero, zero, type 0x08 (uint8), number of dimensions, big-endian sizes, data."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def write_mnist_digits(root, digit_size: int = 20) -> None:
    """load_digits as MNIST files: each digit resized to digit_size px (MNIST's 20) in a 28 px frame."""
    digits = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16
    digits = F.interpolate(digits, size=digit_size, mode="bilinear", align_corners=False, antialias=True)
    pad = (28 - digit_size) // 2
    images = (F.pad(digits, (pad,) * 4) * 255).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    labels = load_digits().target.astype(np.uint8)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, array in {"train-images-idx3-ubyte": images, "train-labels-idx1-ubyte": labels,
                        "t10k-images-idx3-ubyte": images[:10], "t10k-labels-idx1-ubyte": labels[:10]}.items():
        (raw / name).write_bytes(idx_bytes(array))


def as_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def test_mode_collapse_threshold_separates_real_grids_from_collapsed_generators(tmp_path):
    write_mnist_digits(tmp_path)
    photos = [torch.tensor(p).permute(2, 0, 1) for p in load_sample_images().images]
    patches = torch.stack([p[:, y:y + 64:2, x:x + 64:2] for p in photos
                           for y in range(0, 360, 48) for x in range(0, 570, 48)])  # 32 px colour patches
    real_sets = {name: load_images(name, tmp_path, 32) for name in ("digits", "mnist")}
    real_sets = {name: source.uint8(torch.arange(len(source))) for name, source in real_sets.items()}
    real_sets["photo patches"] = patches
    labels = torch.tensor(load_digits().target)
    generator = torch.Generator().manual_seed(0)
    for name, real in real_sets.items():
        probe = DiversityProbe.for_dataset(name, real, grid_size=64, cache_dir=tmp_path / "cache")
        grids = [real[torch.randperm(len(real), generator=generator)[:64]] for _ in range(50)]
        reports = [probe(as_unit(grid)) for grid in grids]
        # measured over 300 grids: ratio 0.90 (photos) .. 1.06; class coverage 0.80 .. 1.0
        assert min(r["diversity_ratio"] for r in reports) > 0.85 > DEFAULTS.mode_collapse, name
        one = as_unit(real[:1].expand(64, -1, -1, -1))
        jittered = (one + torch.randn(one.shape, generator=generator) * 16 / 127.5).clamp(-1, 1)
        flat = torch.full_like(one, 0.2)
        for collapsed in (one, jittered, flat):  # measured: 0, 0.20 .. 0.34, 0
            assert probe(collapsed)["diversity_ratio"] < DEFAULTS.mode_collapse, name
        if name == "photo patches":
            continue
        assert min(r["class_coverage"] for r in reports) > 0.75 > DEFAULTS.mode_collapse_classes, name
        one_class = probe(as_unit(real[labels == 3][:64]))  # varied pixels (0.69), one digit
        two_glyphs = probe(as_unit(real[torch.arange(64) % 2]))
        assert one_class["diversity_ratio"] > DEFAULTS.mode_collapse  # pixels alone miss it ...
        assert max(one_class["class_coverage"], two_glyphs["class_coverage"]) < DEFAULTS.mode_collapse_classes


# ---- trials judged by these rules (train() wired to StepMonitor / DivergenceWatch / DiversityProbe) -----

TINY = {"width": 0.125, "batch_size": 8, "z_dim": 16, "iterations": 40, "log_every": 5, "eval_every": 1000,
        "checkpoint_every": 1000, "eval_generated": 64, "eval_real": 64}


def test_a_startup_spike_in_a_trial_is_recorded_and_the_trial_goes_on(tmp_path):
    from trainables.train import train

    write_mnist_digits(tmp_path / "data", digit_size=28)  # as bench/startup_spike.py frames them
    config = TINY | {"dataset": "mnist", "data_root": str(tmp_path / "data"), "variant": "bssn", "scale": 1.5,
                     "g_lr": 1e-2, "d_lr": 1e-2, "beta1": 0.0, "seed": 1, "batch_size": 64, "z_dim": 128,
                     "iterations": 30, "metrics": ["fd_digits"], "cache_dir": str(tmp_path / "cache")}
    summary = train(config, lambda metrics, checkpoint: None, workdir=tmp_path / "trial")
    assert (summary["diverged"], summary["divergence_cause"], summary["iteration"]) == (0, "", 30)
    events = json.loads((tmp_path / "trial" / "events.json").read_text())
    # bench/startup_spike.py's case: |grad D| 1.8e4 at iteration 2 (over the 1e4 floor), |grad G| 3.5e3 at 1.
    spikes = {e["network"]: e for e in events if e["cause"] == "grad_spike"}
    assert set(spikes) == {"D"} and spikes["D"]["iteration"] == 2
    assert spikes["D"]["values"]["grad_norm"] > 1e4 and spikes["D"]["thresholds"]["grad_norm"] == 1e4
    assert spikes["D"]["layer"] is not None and all(e["action"] == "record" for e in events)


def test_a_sustained_explosion_stops_the_trial_naming_network_layer_and_step(tmp_path):
    from trainables.train import train

    config = TINY | {"variant": "none", "g_lr": 1.0, "d_lr": 1.0, "cache_dir": str(tmp_path / "cache")}
    summary = train(config, lambda metrics, checkpoint: None, workdir=tmp_path / "trial")
    # D's norm is ~1e13 from iteration 2 on: a start-up spike, then an episode from the start-up's end
    # (iteration 6) confirmed 20 iterations later, at the logging step of iteration 25.
    assert (summary["divergence_cause"], summary["divergence_step"], summary["iteration"]) == (
        "grad_explosion", 6, 25)
    assert summary["outcome"] == "diverged"
    events = json.loads((tmp_path / "trial" / "events.json").read_text())
    explosion = next(e for e in events if e["cause"] == "grad_explosion")
    assert (explosion["network"], explosion["action"]) == ("D", "stop")
    assert explosion["layer"] is not None and explosion["values"]["grad_norm"] > 1e4
    assert explosion["thresholds"] == {"grad_norm": 1e4, "recovery": 5, "patience": 20}


# ---- the outcome of real short trials ------------------------------------------------------------

# A cell of the `default` study (study/presets/default.yaml): sn at lr 1e-3, beta1 0.5, 200 iterations.
DEFAULT_STUDY_TRIAL = {"dataset": "digits", "device": "cpu", "width": 0.125, "batch_size": 32,
                       "iterations": 200, "log_every": 20, "eval_every": 100, "checkpoint_every": 100,
                       "eval_generated": 300, "eval_real": 300, "variant": "sn", "g_lr": 1e-3, "d_lr": 1e-3,
                       "beta1": 0.5}


class SingleLatent(torch.nn.Module):
    """A generator that maps every latent of a batch to the batch's first once it has trained `after` G steps:
    a collapse to one image, after learning (as bench/detector.py's single_latent runs)."""

    def __init__(self, generator: torch.nn.Module, after: int):
        super().__init__()
        self.generator, self.after, self.steps = generator, after, 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # the G step's forward (D steps and evaluations run without gradients)
            self.steps += 1
        return self.generator(z[:1].expand_as(z) if self.steps > self.after else z)


@pytest.mark.slow
def test_a_healthy_short_run_of_the_default_study_is_stable(tmp_path):
    from trainables.train import train

    reports = []
    summary = train(DEFAULT_STUDY_TRIAL | {"cache_dir": str(tmp_path / "cache")},
                    lambda metrics, checkpoint: reports.append(metrics), workdir=tmp_path / "trial")
    # measured: fd_digits 466 then 440 against the constant generator's 1329; diversity ratio 0.76 then 1.0
    assert (summary["outcome"], summary["diverged"], summary["iteration"]) == ("stable", 0, 200)
    ratios = [r["diversity_ratio"] for r in reports if "fd_digits" in r]
    assert len(ratios) == 2 and min(ratios) > DEFAULTS.mode_collapse


def test_a_generator_that_never_trains_is_no_learning_not_collapsed(tmp_path):
    from trainables.train import train

    config = TINY | {"g_lr": 1e-12, "eval_every": 20, "cache_dir": str(tmp_path / "cache")}
    summary = train(config, lambda metrics, checkpoint: None, workdir=tmp_path / "trial")
    causes = {e["cause"] for e in json.loads((tmp_path / "trial" / "events.json").read_text())}
    assert "mode_collapse" in causes  # the untrained G's near-constant grid is recorded ...
    assert (summary["outcome"], summary["diverged"]) == ("no_learning", 0)  # ... but it never learned


@pytest.mark.slow
def test_a_generator_that_collapses_after_learning_is_collapsed(tmp_path, monkeypatch):
    import trainables.trial as trial_module
    from trainables.train import train

    build = trial_module.build_generator
    # one image from iteration 151 on: after learning (bench/detector.py's digits/sn_lr1e-3, this config at
    # 1 thread: fd_digits 406 at 150, under a third of the constant level 1329; at 100 it may not have yet)
    monkeypatch.setattr(trial_module, "build_generator", lambda *a, **k: SingleLatent(build(*a, **k), 150))
    config = DEFAULT_STUDY_TRIAL | {"eval_every": 50, "cache_dir": str(tmp_path / "cache")}
    reports = []
    summary = train(config, lambda metrics, checkpoint: reports.append(metrics), workdir=tmp_path / "trial")
    evaluations = [r for r in reports if "fd_digits" in r]
    assert evaluations[2]["diversity_ratio"] > DEFAULTS.mode_collapse  # varied at iteration 150
    assert evaluations[3]["diversity_ratio"] < 0.01  # one image at 200
    events = json.loads((tmp_path / "trial" / "events.json").read_text())
    judged = [(e["cause"], e["iteration"]) for e in events if e["cause"] in ("mode_collapse", "fid_blowup")]
    # mode_collapse, holding at 200, and no blow-up: the metric's rise with it is the collapse. (A young
    # grid's few classes, class_coverage < 0.3, may record an earlier streak too.)
    assert {cause for cause, _ in judged} == {"mode_collapse"}
    assert (summary["outcome"], summary["diverged"], summary["iteration"]) == ("collapsed", 0, 200)
