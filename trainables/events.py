"""Divergence events: named causes, the rule that found each, the values and thresholds, and the action.

A divergence is a state the run does not recover from; a transient that recovers is an event that never stops
the trial. Every threshold and window is a field of trainables.config.DivergenceConfig. The rules:

- `nonfinite_loss`, `nonfinite_grad`: a NaN or inf loss or total gradient norm of D or G, at once.
- `grad_explosion` / `grad_spike`, per network (D, G): a step is over threshold when its total gradient norm
  exceeds max(grad_explosion, grad_explosion_factor x the median of that network's last
  grad_explosion_median_steps in-threshold steps); the relative part needs 8 such steps. A step over threshold
  opens an episode. An episode whose norm stays under threshold for grad_explosion_recovery consecutive
  iterations is a `grad_spike` (recorded, never stops); one that has lasted grad_explosion_patience iterations
  without so recovering is a `grad_explosion`, at its first iteration. Start-up: an episode opened in the
  first grad_explosion_startup iterations is a spike whatever it does (closed as one when the start-up ends;
  if the norm is still over, a new episode opens then), and those iterations stay out of the median.
- `grad_vanishing`: G's total gradient norm below grad_vanishing at grad_vanishing_patience consecutive
  logging steps (G can no longer change: saturated or dead; D's alone is a hinge D separating a batch).
  `d_saturation`: min D(real) - max D(fake) above d_saturation_margin at d_saturation_patience consecutive
  logging steps.
- `mode_collapse`: after mode_collapse_warmup_evals evaluations (an untrained generator's output is nearly
  constant), the evaluation grid's diversity ratio (trainables.diagnostics.DiversityProbe) below
  mode_collapse, or its class coverage (digit data) below mode_collapse_classes, at mode_collapse_patience
  consecutive evaluations, at the first of them. The event says when it first held;
  `DivergenceWatch.collapsed` says whether it holds at the latest evaluation.
- `fid_blowup`: a non-finite metric at once; else, after fid_blowup_warmup_evals evaluations, the metric at
  fid_blowup_patience consecutive evaluations above fid_blowup_cap, or, where the collapse rule does not
  hold at that evaluation (if it does, the rise is the collapse), above fid_blowup_factor x its best so far
  or back at `constant_level` after having learned (a Fréchet distance's tr(sigma_real): no better than the
  best constant generator, i.e. one repeated image); at the first evaluation of that streak.

The outcome of a trial (`DivergenceWatch.outcome`, TRIAL_OUTCOMES) follows from these at its end: diverged
(`DivergenceWatch.divergence`: a stop, or a recorded divergence that never recovered), no_learning (the
metric never went below no_learning x constant_level), collapsed (the collapse rule holds at the end), or
stable. README: Outcomes and divergence.

Per-step causes are tracked on the device by `StepMonitor` without any host synchronisation, for one trial
(0-dim state) or a pack of K (a leading K dim, `StepMonitor.stack`); they are read at logging steps. The
others are judged by `DivergenceWatch` at logging steps and evaluations. Each event names its network (D or
G), the layer where known, the value, the threshold and the step (generator iteration).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from trainables.config import TRIAL_OUTCOMES, DivergenceConfig

NETWORKS = ("D", "G")
# Per-step causes, in the order they are reported when several are found at the same update.
STEP_CAUSES = ("nonfinite_loss", "nonfinite_grad", "grad_explosion", "grad_spike")
MEDIAN_MIN_STEPS = 8  # in-threshold steps before the running median takes part in the threshold
CAUSE_ORDER = (0, 1, 1, 1)  # within one update: the loss before the gradient and what it starts or ends
STABLE, DIVERGED, COLLAPSED, NO_LEARNING = TRIAL_OUTCOMES


@dataclass
class DivergenceEvent:
    cause: str  # one of trainables.config.DIVERGENCE_CAUSES
    iteration: int  # generator iteration at which the condition first held (an episode's, a streak's start)
    network: str  # "D" or "G": whose gradient, loss or output it is (metrics and samples: G)
    layer: str | None  # the layer with the largest (or first non-finite) gradient norm, where known
    values: dict[str, float | str | None]  # what triggered it (non-finite values as strings: "nan", "inf")
    thresholds: dict[str, float | None]  # what it was judged against, and the rule's windows
    action: str  # "stop" or "record"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepFinding:
    """One per-step cause as StepMonitor found it (first occurrence per cause and network)."""

    cause: str
    network: str
    iteration: int
    value: float  # the loss or gradient norm (an episode's peak for explosions and spikes)
    threshold: float | None  # the gradient-norm threshold at the episode's start (None: non-finite causes)
    layer: str | None


def json_safe(value: float | None) -> float | str | None:
    """Floats for JSON and MLflow: NaN and inf become the strings 'nan', 'inf', '-inf'."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else str(value)


def parameter_norms(grads: Sequence[Tensor]) -> Tensor:
    """(P,) the L2 norm of each gradient tensor, in one foreach kernel. Its vector norm is the total
    gradient norm exactly as torch.nn.utils.get_total_norm computes it (which does the same two steps)."""
    return torch.stack(torch._foreach_norm(list(grads)))


def stacked_parameter_norms(grad: Tensor, sizes: Sequence[int]) -> Tensor:
    """(K, P) each member's norm of each parameter, from a pack's flat gradient (K, N) split into `sizes`."""
    return torch.stack([torch.linalg.vector_norm(chunk, dim=1) for chunk in grad.split(list(sizes), dim=1)],
                       dim=1)


class StepMonitor:
    """The per-step causes of one trial (0-dim state) or of a pack's K members (every tensor (K, ...)).

    `update` is called after every D step and every G step and never reads a tensor on the host; `read` (one
    trial) gives what was found, at a logging step. layers: for each network, the layer name of each entry of
    the `layer_norms` passed to update (e.g. `layer_of(name)` per parameter); without them events name no
    layer. The state (`state_dict`) is the whole detector, so a resumed trial continues exactly.
    """

    def __init__(self, config: DivergenceConfig, device: torch.device | str,
                 layers: Mapping[str, Sequence[str]] | None = None):
        self.layers = {network: list((layers or {}).get(network, ())) for network in NETWORKS}
        self.updates = 0
        self.limits = _limits(config, torch.device(device))
        self.state = _fresh_state(config.grad_explosion_median_steps, torch.device(device))
        self.cause_order = torch.tensor(CAUSE_ORDER, device=device)

    # ---- one pack of members -------------------------------------------------------------------------

    @classmethod
    def stack(cls, monitors: Sequence[StepMonitor]) -> StepMonitor:
        """One monitor whose state is the members' stacked along a new leading dim (their order)."""
        first = monitors[0]
        if any(m.updates != first.updates or m.layers != first.layers or m.batch_shape != ()
               for m in monitors):
            raise ValueError("monitors: stack single-trial monitors with the same updates and layers")
        stacked = cls.__new__(cls)
        stacked.layers, stacked.updates, stacked.cause_order = first.layers, first.updates, first.cause_order
        stacked.limits = {key: torch.stack([m.limits[key] for m in monitors]) for key in first.limits}
        steps = max(m.state["history"].shape[-1] for m in monitors)
        stacked.state = {key: torch.stack([_padded(m.state[key], steps) if key == "history" else m.state[key]
                                           for m in monitors]) for key in first.state}
        return stacked

    def member(self, k: int) -> StepMonitor:
        """Member k's own monitor (a copy), as a single trial of its config would have it."""
        single = StepMonitor.__new__(StepMonitor)
        single.layers, single.updates, single.cause_order = self.layers, self.updates, self.cause_order
        single.limits = {key: value[k].clone() for key, value in self.limits.items()}
        steps = int(single.limits["median_steps"])
        single.state = {key: (value[k, ..., :steps] if key == "history" else value[k]).clone()
                        for key, value in self.state.items()}
        return single

    def keep(self, rows: Tensor) -> None:
        """Keep only these members (row indices), in this order."""
        self.limits = {key: value[rows] for key, value in self.limits.items()}
        self.state = {key: value[rows] for key, value in self.state.items()}

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.limits["floor"].shape)

    # ---- the step rule -------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, iteration: int, network: str, loss: Tensor, grad_norm: Tensor,
               layer_norms: Tensor | None = None) -> None:
        """After one step of `network` ("D" or "G") at generator iteration `iteration`: its loss and total
        gradient norm (0-dim, or (K,) for a pack) and optionally its per-layer norms (..., L) (see layers).
        Device-side only: no tensor is read on the host."""
        n = NETWORKS.index(network)
        s, lim = self.state, self.limits
        order = 2 * self.updates
        self.updates += 1
        loss, g = loss.detach().float(), grad_norm.detach().float()
        finite = g.isfinite()

        history = s["history"][..., n, :]
        median = history.nanmedian(dim=-1).values
        enough = (~history.isnan()).sum(-1) >= MEDIAN_MIN_STEPS
        threshold = torch.maximum(lim["floor"], torch.where(enough, lim["factor"] * median, 0.0))
        over = finite & (g > threshold)
        in_startup = iteration <= lim["startup"]
        if layer_norms is None:
            peak_layer = bad_layer = torch.full_like(s["episode_layer"][..., n], -1)
        else:
            norms = layer_norms.detach().float()
            peak_layer = torch.where(norms.isfinite(), norms, -1.0).argmax(-1)
            bad_layer = (~norms.isfinite()).to(torch.uint8).argmax(-1)

        start, last_over = s["episode_start"][..., n], s["episode_last_over"][..., n]
        peak, opened_at = s["episode_peak"][..., n], s["episode_threshold"][..., n]
        layer, startup_episode = s["episode_layer"][..., n], s["episode_startup"][..., n]
        active = start >= 0
        # An episode ends as a spike when the norm has stayed under threshold for `recovery` iterations, or
        # (a start-up episode) when the start-up is over.
        recovered = active & finite & ~over & (iteration - last_over >= lim["recovery"])
        closed = recovered | (active & startup_episode & ~in_startup)
        spike = (start, peak, opened_at, layer)  # the closed episode as it was, read before the writes below
        active = active & ~closed
        opened = over & ~active
        higher = opened | (over & (g > peak))
        start = torch.where(opened, iteration, torch.where(closed, -1, start))
        peak = torch.where(higher, g, peak)
        layer = torch.where(higher, peak_layer, layer)
        opened_at = torch.where(opened, threshold, opened_at)
        startup_episode = torch.where(opened, in_startup, startup_episode)
        last_over = torch.where(over, iteration, last_over)
        exploded = (start >= 0) & ~startup_episode & (iteration - start + 1 >= lim["patience"])
        now, no_layer = torch.full_like(start, iteration), torch.full_like(layer, -1)
        nan = torch.full_like(g, math.nan)
        # The first occurrence of each cause, in STEP_CAUSES order, on this network: one write per array.
        self._first(n, torch.stack([~loss.isfinite(), ~finite, exploded, closed], dim=-1), {
            "first_iteration": torch.stack([now, now, start, spike[0]], dim=-1),
            "first_value": torch.stack([loss, g, peak, spike[1]], dim=-1),
            "first_threshold": torch.stack([nan, nan, opened_at, spike[2]], dim=-1),
            "first_layer": torch.stack([no_layer, bad_layer, layer, spike[3]], dim=-1),
            "first_order": order + self.cause_order,
        })
        for key, value in (("episode_start", start), ("episode_last_over", last_over), ("episode_peak", peak),
                           ("episode_threshold", opened_at), ("episode_layer", layer),
                           ("episode_startup", startup_episode)):
            s[key][..., n] = value

        # This run's normal: finite, in-threshold steps after the start-up, in a ring of median_steps.
        accepted = finite & ~over & ~in_startup
        position = s["history_position"][..., n]
        slot = position.unsqueeze(-1)
        kept = history.gather(-1, slot).squeeze(-1)
        history.scatter_(-1, slot, torch.where(accepted, g, kept).unsqueeze(-1))
        s["history_position"][..., n] = torch.where(accepted, (position + 1) % lim["median_steps"], position)

    def _first(self, n: int, holds: Tensor, updates: dict[str, Tensor]) -> None:
        """Write updates (..., causes) into the first-occurrence arrays of network n where a cause holds
        (holds (..., causes)) for the first time."""
        s = self.state
        new = holds & (s["first_iteration"][..., n, :] < 0)
        for key, update in updates.items():
            s[key][..., n, :] = torch.where(new, update, s[key][..., n, :])

    # ---- reading and checkpoints ---------------------------------------------------------------------

    def read(self) -> list[StepFinding]:
        """Every per-step cause found so far (first occurrence per cause and network), in the order found.
        One trial's monitor only (a pack: read `member(k)`); synchronises with the host."""
        if self.batch_shape != ():
            raise ValueError("read: a stacked monitor; read member(k) instead")
        s = self.state
        table = zip(*(s[key].flatten().tolist() for key in
                      ("first_iteration", "first_order", "first_value", "first_threshold", "first_layer")),
                    strict=True)
        found = []
        for index, (iteration, order, value, threshold, layer) in enumerate(table):
            if iteration < 0:
                continue
            n, cause = divmod(index, len(STEP_CAUSES))
            names = self.layers[NETWORKS[n]]
            found.append((order, cause, StepFinding(
                STEP_CAUSES[cause], NETWORKS[n], int(iteration), value,
                None if math.isnan(threshold) else threshold,
                names[int(layer)] if 0 <= layer < len(names) else None)))
        return [finding for *_, finding in sorted(found, key=lambda item: item[:2])]

    def open_explosions(self, iteration: int) -> dict[str, int]:
        """{network: first iteration} of each explosion episode still open at `iteration`: not recovered for
        at least the patience, outside the start-up. One trial's monitor; reads the host."""
        s, lim = self.state, self.limits
        start = s["episode_start"]
        open_ = (start >= 0) & ~s["episode_startup"] & (iteration - start + 1 >= lim["patience"])
        return {network: int(first) for network, first, held in zip(NETWORKS, start.tolist(), open_.tolist(),
                                                                      strict=True) if held}

    def state_dict(self) -> dict:
        return {"updates": self.updates, **{key: value.cpu() for key, value in self.state.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        for key, value in self.state.items():
            value.copy_(state[key])


def _limits(config: DivergenceConfig, device: torch.device) -> dict[str, Tensor]:
    """The config's explosion rule as 0-dim tensors, so that pack members broadcast their own."""
    return {
        "floor": torch.tensor(config.grad_explosion, dtype=torch.float32, device=device),
        "factor": torch.tensor(config.grad_explosion_factor or 0.0, dtype=torch.float32, device=device),
        "median_steps": torch.tensor(config.grad_explosion_median_steps, device=device),
        "patience": torch.tensor(config.grad_explosion_patience, device=device),
        "recovery": torch.tensor(config.grad_explosion_recovery, device=device),
        "startup": torch.tensor(config.grad_explosion_startup, device=device),
    }


def _fresh_state(median_steps: int, device: torch.device) -> dict[str, Tensor]:
    causes, networks = len(STEP_CAUSES), len(NETWORKS)

    def full(shape: tuple[int, ...], value: float | bool, dtype: torch.dtype) -> Tensor:
        return torch.full(shape, value, dtype=dtype, device=device)

    return {
        "first_iteration": full((networks, causes), -1, torch.int64),
        "first_order": full((networks, causes), 0, torch.int64),
        "first_value": full((networks, causes), 0.0, torch.float32),
        "first_threshold": full((networks, causes), math.nan, torch.float32),
        "first_layer": full((networks, causes), -1, torch.int64),
        "episode_start": full((networks,), -1, torch.int64),
        "episode_last_over": full((networks,), -1, torch.int64),
        "episode_peak": full((networks,), 0.0, torch.float32),
        "episode_threshold": full((networks,), math.nan, torch.float32),
        "episode_layer": full((networks,), -1, torch.int64),
        "episode_startup": full((networks,), False, torch.bool),
        "history": full((networks, median_steps), math.nan, torch.float32),
        "history_position": full((networks,), 0, torch.int64),
    }


def _padded(history: Tensor, steps: int) -> Tensor:
    """A (2, W) history ring padded with empty (NaN) slots to (2, steps)."""
    return torch.nn.functional.pad(history, (0, steps - history.shape[-1]), value=math.nan)


@dataclass
class DivergenceWatch:
    """Judges every cause at logging steps and evaluations and keeps the event log of the trial.

    constant_level: the primary metric's value for the best constant generator (a Fréchet distance's
    tr(sigma_real), trainables.metrics.Evaluator.constant_level), or None where unknown; set at setup.
    """

    config: DivergenceConfig
    constant_level: float | None = None
    events: list[DivergenceEvent] = field(default_factory=list)
    best_metric: float = math.inf
    first_metric: float = math.nan
    evaluations: int = 0
    vanishing_streak: int = 0
    saturation_streak: int = 0
    blowup_streak: int = 0
    blowup_start: int = -1
    collapse_streak: int = 0
    collapse_start: int = -1
    exploding: dict[str, int] = field(default_factory=dict)  # network -> start of an explosion still open

    @property
    def collapsed(self) -> bool:
        """Whether the mode-collapse rule held at the latest evaluations (patience of them)."""
        return self.collapse_streak >= self.config.mode_collapse_patience

    @property
    def learned(self) -> bool | None:
        """Whether the primary metric has gone below config.no_learning x constant_level at some evaluation;
        None where that is not judged (no constant level, no_learning None, or no finite evaluation yet)."""
        if self.constant_level is None or self.config.no_learning is None or math.isinf(self.best_metric):
            return None
        return self.best_metric < self.config.no_learning * self.constant_level

    @property
    def divergence(self) -> tuple[str, int] | None:
        """(cause, first iteration) of the divergence that makes the trial `diverged`, or None: the event that
        stopped it (other than mode_collapse); else, for causes only recorded, one the run never recovered
        from: a non-finite loss or gradient; an explosion episode still open, or one the run never learned
        after; vanishing gradients or the metric blow-up rule holding at the latest check."""
        stop = self.stop_event
        if stop is not None:
            return None if stop.cause == "mode_collapse" else (stop.cause, stop.iteration)
        first = {event.cause: event for event in reversed(self.events)}  # each cause's first event
        for cause in ("nonfinite_loss", "nonfinite_grad"):
            if cause in first:
                return cause, first[cause].iteration
        if self.exploding:
            return "grad_explosion", min(self.exploding.values())
        if "grad_explosion" in first and self.learned is False:
            return "grad_explosion", first["grad_explosion"].iteration
        if "grad_vanishing" in first and self.vanishing_streak >= self.config.grad_vanishing_patience:
            return "grad_vanishing", first["grad_vanishing"].iteration
        if self.blowup_streak >= self.config.fid_blowup_patience:
            return "fid_blowup", self.blowup_start
        return None

    @property
    def outcome(self) -> str:
        """The trial's verdict, one of TRIAL_OUTCOMES, from what the watch holds now (README: Outcomes).

        diverged: a `divergence`. no_learning: never learned (`learned` False). collapsed: stopped on
        mode_collapse, or the mode-collapse rule holds at the latest evaluation. stable: every other run."""
        if self.divergence is not None:
            return DIVERGED
        if self.learned is False:
            return NO_LEARNING
        if self.stop_event is not None or self.collapsed:
            return COLLAPSED
        return STABLE

    @property
    def stop_event(self) -> DivergenceEvent | None:
        """The first event whose policy stopped the trial, if any."""
        return next((event for event in self.events if event.action == "stop"), None)

    def _record(self, cause: str, iteration: int, network: str, values: dict, thresholds: dict,
                layer: str | None = None) -> None:
        if any(event.cause == cause and event.network == network for event in self.events):
            return  # one event per cause and network: the first occurrence is the one that matters
        safe_values = {key: json_safe(value) for key, value in values.items()}
        self.events.append(DivergenceEvent(cause, iteration, network, layer, safe_values, thresholds,
                                           self.config.action(cause)))

    def check_steps(self, monitor: StepMonitor, iteration: int | None = None) -> None:
        """Per-step causes, read from the device-side monitor (one trial's) at a logging step; with the
        logging step's `iteration`, also which explosions are still open then (for `divergence`)."""
        cfg = self.config
        if iteration is not None:
            self.exploding = monitor.open_explosions(iteration)
        for found in monitor.read():
            key = "loss" if found.cause == "nonfinite_loss" else "grad_norm"
            thresholds = {}
            if found.cause in ("grad_explosion", "grad_spike"):
                thresholds = {"grad_norm": found.threshold, "recovery": cfg.grad_explosion_recovery}
                if found.cause == "grad_explosion":
                    thresholds["patience"] = cfg.grad_explosion_patience
            self._record(found.cause, found.iteration, found.network, {key: found.value}, thresholds,
                         found.layer)

    def check_logging_step(self, iteration: int, *, grad_norm_d: float, grad_norm_g: float, d_real_min: float,
                           d_fake_max: float) -> None:
        """Vanishing gradients and D saturation, each needing several consecutive logging steps.

        grad_vanishing is G's total gradient norm below the threshold: a G whose output saturated (tanh at
        +-1) or whose units died gets no gradient whatever D does, so it never changes again, a state no run
        leaves (an sn D at lr 10 kills G in its first step so). D's alone is a hinge D separating the batch
        (its gradient is exactly 0 then), which a run leaves once G catches up, and which d_saturation
        records (measured: bench/detector.py)."""
        cfg = self.config
        vanishing = math.isfinite(grad_norm_g) and grad_norm_g < cfg.grad_vanishing
        self.vanishing_streak = self.vanishing_streak + 1 if vanishing else 0
        if self.vanishing_streak >= cfg.grad_vanishing_patience:
            self._record("grad_vanishing", iteration, "G", {"grad_norm": grad_norm_g,
                                                            "grad_norm_d": grad_norm_d},
                         {"grad_norm": cfg.grad_vanishing, "patience": cfg.grad_vanishing_patience})
        margin = d_real_min - d_fake_max
        self.saturation_streak = self.saturation_streak + 1 if margin > cfg.d_saturation_margin else 0
        if self.saturation_streak >= cfg.d_saturation_patience:
            self._record("d_saturation", iteration, "D",
                         {"d_real_min": d_real_min, "d_fake_max": d_fake_max, "margin": margin},
                         {"margin": cfg.d_saturation_margin, "patience": cfg.d_saturation_patience})

    def check_evaluation(self, iteration: int, metric: str, value: float,
                         diversity: Mapping[str, float] | None = None) -> None:
        """Mode collapse and the metric blow-up (the primary metric, lower is better), at an evaluation.

        diversity: DiversityProbe's report of this evaluation's grid (`diversity_ratio` and `class_coverage`
        are judged). Where the collapse rule holds, a finite metric's rise (over factor x best, or back at the
        constant level) is no blow-up: it rose because the samples lost their variety, which is the collapse
        (measured: bench/detector.py). The cap holds whatever."""
        cfg = self.config
        self.evaluations += 1
        collapsed_now = diversity is not None and self._collapse_holds(diversity)
        if diversity is not None:
            self.collapse_streak, self.collapse_start = _streak(collapsed_now, self.collapse_streak,
                                                                self.collapse_start, iteration)
            if self.collapse_streak >= cfg.mode_collapse_patience:
                self._record("mode_collapse", self.collapse_start, "G", dict(diversity), {
                    "diversity_ratio": cfg.mode_collapse, "class_coverage": cfg.mode_collapse_classes,
                    "warmup_evals": cfg.mode_collapse_warmup_evals, "patience": cfg.mode_collapse_patience})
        best = self.best_metric
        thresholds = {"factor": cfg.fid_blowup_factor, "cap": cfg.fid_blowup_cap,
                      "constant_level": self.constant_level, "no_learning": cfg.no_learning,
                      "warmup_evals": cfg.fid_blowup_warmup_evals, "patience": cfg.fid_blowup_patience}
        values = {metric: value, f"best_{metric}": best, f"first_{metric}": self.first_metric,
                  "constant_level": self.constant_level}
        if not math.isfinite(value):
            self._record("fid_blowup", iteration, "G", values, thresholds)
            return
        self.best_metric = min(best, value)
        if math.isnan(self.first_metric):
            self.first_metric = value
        # Learned, then lost it: no better than a constant generator again. (Never learned: no_learning.)
        fell_back = bool(self.learned) and value >= self.constant_level
        risen = not collapsed_now and (value > cfg.fid_blowup_factor * best or fell_back)
        blown_up = self.evaluations > cfg.fid_blowup_warmup_evals and (
            risen or (cfg.fid_blowup_cap is not None and value > cfg.fid_blowup_cap))
        self.blowup_streak, self.blowup_start = _streak(blown_up, self.blowup_streak, self.blowup_start,
                                                        iteration)
        if self.blowup_streak >= cfg.fid_blowup_patience:
            self._record("fid_blowup", self.blowup_start, "G", values, thresholds)

    def _collapse_holds(self, diversity: Mapping[str, float]) -> bool:
        """The mode-collapse rule at one evaluation (after the warm-up): too little diversity or classes."""
        cfg, coverage = self.config, diversity.get("class_coverage")
        return self.evaluations > cfg.mode_collapse_warmup_evals and (
            (cfg.mode_collapse is not None and diversity["diversity_ratio"] < cfg.mode_collapse)
            or (cfg.mode_collapse_classes is not None and coverage is not None
                and coverage < cfg.mode_collapse_classes))

    def state_dict(self) -> dict:
        return {"events": [event.to_json() for event in self.events],
                **{key: getattr(self, key) for key in _WATCH_STATE}}

    def load_state_dict(self, state: dict) -> None:
        self.events = [DivergenceEvent(**event) for event in state["events"]]
        for key in _WATCH_STATE:
            setattr(self, key, state[key])


# DivergenceWatch's scalar state beside its events: what a checkpoint keeps for an exact resume.
_WATCH_STATE = ("best_metric", "first_metric", "evaluations", "vanishing_streak", "saturation_streak",
                "blowup_streak", "blowup_start", "collapse_streak", "collapse_start", "exploding")


def _streak(holds: bool, streak: int, start: int, iteration: int) -> tuple[int, int]:
    """(consecutive checks that held, the iteration of the first of them; -1 when none)."""
    if not holds:
        return 0, -1
    return streak + 1, start if streak else iteration
