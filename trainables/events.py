"""Divergence events: named causes, the values that triggered them, and what the trial did about it.

Per-step causes (non-finite loss or gradient, exploding gradient) are tracked on the device by `StepMonitor`
without any host synchronisation; the exact first iteration is read back at the next logging step. Causes that
need a history (vanishing gradients, D saturation) are judged at logging steps, and the metric blow-up and
mode collapse at evaluations, by `DivergenceWatch`. A cause whose policy is `stop` ends the trial normally;
`record` only records it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from trainables.config import DivergenceConfig

# Per-step causes in the order they are reported when several start at the same iteration.
STEP_CAUSES = ("nonfinite_loss", "nonfinite_grad", "grad_explosion")


@dataclass
class DivergenceEvent:
    cause: str  # one of trainables.config.DIVERGENCE_CAUSES
    iteration: int  # the generator iteration at which the condition first held
    values: dict[str, float]  # what triggered it (non-finite values are written as strings: "nan", "inf")
    thresholds: dict[str, float]
    action: str  # "stop" or "record"

    def to_json(self) -> dict:
        return asdict(self)


def json_safe(value: float) -> float | str:
    """Floats for JSON and MLflow: NaN and inf become the strings 'nan', 'inf', '-inf'."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


class StepMonitor:
    """Remembers, on the device, the first iteration at which each per-step cause held, and the value then.

    `update` is called after every D step and every G step with 0-dim tensors and never reads them on the
    host. Events are ordered as they happened: by update, and within one update the loss before the gradient.
    """

    def __init__(self, explosion_threshold: float, device: torch.device):
        self.explosion_threshold = explosion_threshold
        self.updates = 0
        self.first_iteration = torch.full((len(STEP_CAUSES),), -1, dtype=torch.int64, device=device)
        self.first_order = torch.zeros(len(STEP_CAUSES), dtype=torch.int64, device=device)
        self.first_value = torch.zeros(len(STEP_CAUSES), dtype=torch.float32, device=device)
        self.order_within_update = torch.tensor([0, 1, 1], device=device)  # loss, then gradient

    def update(self, iteration: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """loss: the step's loss; grad_norm: the total gradient norm of the network it updated. Both 0-dim, or
        (K,) for the K members of a pack (trainables/packing.py), whose state then has a leading K dim."""
        grad_finite = grad_norm.isfinite()
        exploded = grad_finite & (grad_norm > self.explosion_threshold)
        holds = torch.stack([~loss.isfinite(), ~grad_finite, exploded], dim=-1)
        values = torch.stack([loss.detach(), grad_norm, grad_norm], dim=-1).float()
        order = self.order_within_update + 2 * self.updates
        self.updates += 1
        new = holds & (self.first_iteration < 0)
        self.first_iteration = torch.where(new, iteration, self.first_iteration)
        self.first_order = torch.where(new, order, self.first_order)
        self.first_value = torch.where(new, values, self.first_value)

    def read(self) -> list[tuple[str, int, float]]:
        """(cause, first iteration, value) for every cause seen so far, in the order they happened."""
        firsts, orders = self.first_iteration.tolist(), self.first_order.tolist()
        values = self.first_value.tolist()
        seen = sorted((order, cause, it, value) for cause, it, order, value
                      in zip(STEP_CAUSES, firsts, orders, values, strict=True) if it >= 0)
        return [(cause, it, value) for _, cause, it, value in seen]

    def state_dict(self) -> dict:
        return {"updates": self.updates, "first_iteration": self.first_iteration.cpu(),
                "first_order": self.first_order.cpu(), "first_value": self.first_value.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.first_iteration.copy_(state["first_iteration"])
        self.first_order.copy_(state["first_order"])
        self.first_value.copy_(state["first_value"])


@dataclass
class DivergenceWatch:
    """Judges every cause at logging steps and evaluations and keeps the event log of the trial."""

    config: DivergenceConfig
    events: list[DivergenceEvent] = field(default_factory=list)
    best_metric: float = math.inf
    evaluations: int = 0
    vanishing_streak: int = 0
    saturation_streak: int = 0

    @property
    def stop_event(self) -> DivergenceEvent | None:
        """The first event whose policy stopped the trial, if any."""
        return next((event for event in self.events if event.action == "stop"), None)

    def _record(self, cause: str, iteration: int, values: dict, thresholds: dict) -> None:
        if any(event.cause == cause for event in self.events):
            return  # one event per cause: the first occurrence is the one that matters
        action = self.config.policy.get(cause, "stop")
        safe_values = {key: json_safe(value) for key, value in values.items()}
        self.events.append(DivergenceEvent(cause, iteration, safe_values, thresholds, action))

    def check_steps(self, monitor: StepMonitor) -> None:
        """Per-step causes, read from the device-side monitor at a logging step."""
        for cause, iteration, value in monitor.read():
            threshold = {"grad_explosion": {"grad_norm": self.config.grad_explosion}}.get(cause, {})
            key = "loss" if cause == "nonfinite_loss" else "grad_norm"
            self._record(cause, iteration, {key: value}, threshold)

    def check_logging_step(self, iteration: int, *, grad_norm_d: float, d_real_min: float,
                           d_fake_max: float) -> None:
        """Vanishing D gradients and D saturation, each needing several consecutive logging steps."""
        cfg = self.config
        vanishing = math.isfinite(grad_norm_d) and grad_norm_d < cfg.grad_vanishing
        self.vanishing_streak = self.vanishing_streak + 1 if vanishing else 0
        if self.vanishing_streak >= cfg.grad_vanishing_patience:
            self._record("grad_vanishing", iteration, {"grad_norm_d": grad_norm_d},
                         {"grad_norm": cfg.grad_vanishing, "patience": cfg.grad_vanishing_patience})
        margin = d_real_min - d_fake_max
        self.saturation_streak = self.saturation_streak + 1 if margin > cfg.d_saturation_margin else 0
        if self.saturation_streak >= cfg.d_saturation_patience:
            self._record("d_saturation", iteration,
                         {"d_real_min": d_real_min, "d_fake_max": d_fake_max},
                         {"margin": cfg.d_saturation_margin, "patience": cfg.d_saturation_patience})

    def check_evaluation(self, iteration: int, metric: str, value: float, diversity: float | None) -> None:
        """The metric blow-up (or a non-finite metric) and, when enabled, mode collapse."""
        cfg = self.config
        self.evaluations += 1
        thresholds = {"factor": cfg.fid_blowup_factor, "warmup_evals": cfg.fid_blowup_warmup_evals}
        if cfg.fid_blowup_cap is not None:
            thresholds["cap"] = cfg.fid_blowup_cap
        past_warmup = self.evaluations > cfg.fid_blowup_warmup_evals
        blown_up = not math.isfinite(value) or (past_warmup and (
            value > cfg.fid_blowup_factor * self.best_metric
            or (cfg.fid_blowup_cap is not None and value > cfg.fid_blowup_cap)))
        if blown_up:
            values = {metric: value, f"best_{metric}": self.best_metric}
            self._record("fid_blowup", iteration, values, thresholds)
        elif math.isfinite(value):
            self.best_metric = min(self.best_metric, value)
        if cfg.mode_collapse is not None and diversity is not None and diversity < cfg.mode_collapse:
            self._record("mode_collapse", iteration, {"diversity": diversity},
                         {"diversity": cfg.mode_collapse})

    def state_dict(self) -> dict:
        return {
            "events": [event.to_json() for event in self.events],
            "best_metric": self.best_metric,
            "evaluations": self.evaluations,
            "vanishing_streak": self.vanishing_streak,
            "saturation_streak": self.saturation_streak,
        }

    def load_state_dict(self, state: dict) -> None:
        self.events = [DivergenceEvent(**event) for event in state["events"]]
        self.best_metric = state["best_metric"]
        self.evaluations = state["evaluations"]
        self.vanishing_streak = state["vanishing_streak"]
        self.saturation_streak = state["saturation_streak"]
