"""One typed configuration for one trial: every default lives here, validated once at the edge.

A study (study/) builds these from its spec; the command line (`python -m trainables`) builds one from a
YAML file plus `--set key=value` overrides. Defaults describe the quick built-in run: digits on CPU.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

DATASETS = ("digits", "cifar10", "stl10", "celeba", "imagefolder", "mnist")
# CelebA: all 202,599 aligned faces (the official preprocessing), or one list_eval_partition.txt split.
CELEBA_SPLITS = ("all", "train", "valid", "test")
ARCHITECTURES = ("standard_cnn", "resnet")
VARIANTS = (
    "none", "sn", "ssn", "bsn", "bssn", "strict_sn", "sn_gamma_shared", "sn_gamma_layer",
    "weight_norm", "layer_norm", "batch_norm",
)
SCALED_VARIANTS = ("ssn", "bssn", "strict_sn")  # the variants that take the paper's constant c (`scale`)
LOSSES = ("hinge", "non_saturating", "wgan_gp")
METRICS = ("fid", "is", "kid", "fd_digits")
# Metrics that stand in for FID offline, and what they are (a report marks them so).
SURROGATE_METRICS = {"fd_digits": "offline surrogate: the Fréchet distance in a small digits classifier's "
                                  "features, not FID"}
DIVERGENCE_CAUSES = (
    "nonfinite_loss", "nonfinite_grad", "grad_explosion", "grad_spike", "grad_vanishing",
    "fid_blowup", "d_saturation", "mode_collapse",
)
# A trial's verdict at its end (trainables.events.DivergenceWatch.outcome; the README defines each). A trial
# that crashed has none of its own: study/ records it as "failed" (study/layout.py's OUTCOMES).
TRIAL_OUTCOMES = ("stable", "diverged", "collapsed", "no_learning")
# Causes that only ever record: a transient the run recovered from (trainables/events.py) never stops it.
TRANSIENT_CAUSES = ("grad_spike",)
# The paper trains the learned-gamma SN baselines with WGAN-GP; every other variant with the hinge loss.
GAMMA_VARIANTS = ("sn_gamma_shared", "sn_gamma_layer")
# Trial packing (trainables/packing.py): the fields in which the members of a pack may differ (every other
# field is shared), and the losses that pack (WGAN-GP's penalty needs D's input gradient inside vmap).
PACK_MEMBER_FIELDS = ("g_lr", "d_lr", "beta1", "beta2", "scale", "seed", "divergence")
PACKED_LOSSES = ("hinge", "non_saturating")
# Resolutions each architecture is built for (SNGAN's standard CNN: mg = 4, 6, 8; ResNet: 32 and 128 px).
RESOLUTIONS = {"standard_cnn": (32, 48, 64), "resnet": (32, 128)}
DEVICES = ("auto", "cpu", "cuda", "cuda:<index>")  # auto: cuda when available, else cpu
# Named bounds of sizes, (lowest, highest) valid value: a value past its upper bound is a typo, not an
# experiment, and would fail (or run for ever) only once the trial has started. The lower bounds are each
# field's own constraint (width's is exclusive: > 0).
SIZE_BOUNDS: dict[str, tuple[int | float, int | float]] = {
    "iterations": (1, 10_000_000),  # 12.5x the paper's longest run (STL-10 at n_dis 1, 800k)
    "batch_size": (2, 8192), "d_batch_size": (2, 8192), "g_batch_size": (2, 8192),  # 128x the paper's 64
    "width": (0.0, 16.0),  # channels x width: 1.0 is the paper's network (standard CNN: 512 channels at most)
    "z_dim": (1, 4096),  # 32x the paper's 128
    "n_dis": (1, 100),  # 20x the paper's 5
    # Images per evaluation: the full FID protocol's 50k generated vs a whole training set (ImageNet: 1.28M).
    "eval_generated": (2, 2_000_000), "eval_real": (2, 2_000_000), "eval_generated_is": (2, 2_000_000),
}
# Seeds are 32-bit, as numpy's: the trial derives its streams from them (the evaluation's is seed x 1000003 +
# iteration) and those must stay within torch's 64-bit seed range.
SEED_MAX = 2**32 - 1


# One home for each rule that a TrialConfig and the builders taking these values alone both enforce
# (normalization.normalize, networks.build_*, data.BatchSampler): each raises ValueError naming its field.

def check_scale(variant: str, scale: float) -> None:
    """The paper's constant c: a finite number > 0, and other than 1.0 only for SCALED_VARIANTS."""
    number = isinstance(scale, int | float) and not isinstance(scale, bool)
    if not (number and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: the constant c must be a finite number > 0, got {scale!r}")
    if scale != 1.0 and variant not in SCALED_VARIANTS:
        raise ValueError(
            f"scale: variant {variant!r} takes no constant c (got scale={scale}); "
            f"scale applies to {', '.join(SCALED_VARIANTS)}, every other variant needs scale 1.0"
        )


def check_resolution(architecture: str, resolution: int) -> None:
    """`resolution` (px per side) must be one that `architecture` (one of ARCHITECTURES) is built for."""
    valid = RESOLUTIONS[architecture]
    if resolution not in valid:
        raise ValueError(
            f"resolution: {resolution!r} px is not built by architecture {architecture!r}; "
            f"valid: {', '.join(map(str, valid))}"
        )


def check_seed(seed: int, field: str = "seed") -> None:
    """A seed (`field` names it) is an int in 0 .. SEED_MAX."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{field}: {seed!r} is out of range; valid: an int in 0 .. {SEED_MAX} (2**32 - 1)")


def check_device(device: str) -> None:
    """The form of a device name, one of DEVICES (whether this machine has it is for the trial to find)."""
    kind, _, index = device.partition(":")
    if not (device in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit())):
        raise ValueError(f"device: {device!r} is not a device a trial runs on; valid: {', '.join(DEVICES)}")


def check_batch_size(batch_size: int, field: str = "batch_size") -> None:
    """At least two images per batch (`field` names it): D's loss compares a batch, sample diversity pairs."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"{field}: must be an int >= 2, got {batch_size!r}")


class StrictModel(BaseModel):
    """Configuration as data: an unknown field is an error, and so is an invalid value assigned later."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DivergenceConfig(StrictModel):
    """Thresholds, windows and policies of the divergence watch (trainables/events.py, which gives each rule).

    A divergence is a state the run does not recover from; every detector has a persistence rule, and a
    gradient spike that recovers is an event (`grad_spike`) that never stops the trial. Non-finite losses and
    gradients stop at once. Windows are in generator iterations, logging steps or evaluations, as named;
    a window set to more than the run can hold is refused by TrialConfig (a default one that does not fit
    leaves its detector idle, listed by TrialConfig.idle_detectors).
    """

    # Gradient explosion, per network (D and G each): a step is over threshold when its total gradient norm
    # exceeds both grad_explosion and grad_explosion_factor x the running median of that network's recent
    # in-threshold steps (an absolute floor alone misfires where healthy norms are large; a relative rule
    # alone misfires where the median is ~0, e.g. a saturated hinge D, whose gradient is exactly 0).
    grad_explosion: float = Field(1e4, gt=0)  # absolute floor of the threshold (total gradient norm)
    grad_explosion_factor: float | None = Field(100.0, gt=1)  # x running median (None: the floor only)
    grad_explosion_median_steps: int = Field(64, ge=8)  # in-threshold steps of that network in the median
    # An episode starts at the first step over threshold. It is a grad_explosion (at its first iteration)
    # once it has lasted grad_explosion_patience iterations without recovering, and a grad_spike if the
    # norm comes back under threshold for grad_explosion_recovery consecutive iterations first.
    grad_explosion_patience: int = Field(20, ge=1)
    grad_explosion_recovery: int = Field(5, ge=1)
    # Start-up: steps over threshold in the first iterations are spikes, never explosions, and stay out of
    # the median. Measured (bench/startup_spike.py, lr 1e-2, bssn c 1.5, MNIST format): Adam's first steps
    # move every D weight by +-lr while the SN power iteration, started from a random u as in the official
    # code, lags the new weights: |grad G| 3.5e3 at iteration 1, |grad D| 1.8e4 at iteration 2, both near
    # their run's level from iteration 3 on (x947 and 5.6e5 in G's first step before the loop took the
    # official power-iteration order).
    grad_explosion_startup: int = Field(5, ge=0)
    grad_vanishing: float = Field(1e-8, gt=0)  # G's total gradient norm below this (G frozen for good) ...
    grad_vanishing_patience: int = Field(5, ge=1)  # ... at this many consecutive logging steps
    # Metric blow-up, after the warm-up evaluations, at fid_blowup_patience consecutive evaluations: the
    # metric above factor x its best so far, above the cap, or never good: (a Frechet distance) at or above
    # that of the best constant generator, tr(sigma_real), and worse than at the first evaluation. Non-finite:
    # at once.
    fid_blowup_factor: float = Field(4.0, gt=1)
    fid_blowup_cap: float | None = Field(None, gt=0)  # None: no cap
    fid_blowup_warmup_evals: int = Field(1, ge=0)  # evaluations not judged (a young G is no better yet)
    fid_blowup_patience: int = Field(1, ge=1)
    d_saturation_margin: float = Field(0.0, ge=0)  # min D(real) - max D(fake) above this: separated ...
    d_saturation_patience: int = Field(5, ge=1)  # ... at this many consecutive logging steps
    # Mode collapse, after the warm-up, at mode_collapse_patience consecutive evaluations: the grid's
    # diversity over real images' (trainables.diagnostics.DiversityProbe; 1 = as varied as the data) below
    # mode_collapse, or on digit data its effective share of the 10 classes below mode_collapse_classes
    # (None: that rule off). Calibrated on 64-image grids (tests/test_events.py): real digits, MNIST-framed
    # digits and photo patches give diversity ratios 0.90-1.06 and class shares 0.80-1.0; one repeated sample
    # 0, with pixel noise of 4 / 16 / 32 (of 255) 0.05-0.09 / 0.20-0.34 / 0.38-0.67, a flat field 0, two
    # alternating glyphs 0.64 (class share 0.2), real images of one digit 0.69 (class share 0.15-0.16). Young
    # healthy generators (bench/detector.py, 200 iterations) are less varied than data: ratios from 0.58,
    # class shares from 0.45 at their last evaluation; generators collapsed to one image give 0 and 0.1.
    mode_collapse: float | None = Field(0.4, gt=0, lt=1)
    mode_collapse_classes: float | None = Field(0.3, gt=0, lt=1)
    mode_collapse_warmup_evals: int = Field(1, ge=0)  # not judged: an untrained G's output is near-constant
    mode_collapse_patience: int = Field(1, ge=1)
    # Learning, judged at the end for the outcome (never a stop): a run has learned once its primary metric
    # has gone below no_learning x the best constant generator's level (a Frechet distance's tr(sigma_real),
    # which any generator without variety scores at least); a run that never has is `no_learning`. None:
    # not judged, as for a primary metric without such a level (kid). Calibrated on fd_digits
    # (bench/detector.py): runs a person judged healthy reach 0.09-0.44 of the level by 200 iterations, runs
    # that never learned stay at 0.66-1.35 (noise, blobs, flat fields, one repeated image): 0.55 is midway.
    no_learning: float | None = Field(0.55, gt=0, le=1)
    policy: dict[str, Literal["stop", "record"]] = Field(
        default_factory=lambda: {
            "nonfinite_loss": "stop", "nonfinite_grad": "stop", "grad_explosion": "stop",
            "grad_spike": "record", "grad_vanishing": "stop", "fid_blowup": "stop", "d_saturation": "record",
            "mode_collapse": "record",
        }
    )
    # What a stopped trial reports as its objective: finite, so that ASHA and Optuna keep working.
    diverged_objective: float = Field(1e4, gt=0)

    @field_validator("policy")
    @classmethod
    def _known_causes(cls, policy: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(policy) - set(DIVERGENCE_CAUSES))
        if unknown:
            raise ValueError(f"unknown divergence cause(s) {unknown}; valid: {', '.join(DIVERGENCE_CAUSES)}")
        stopping = [cause for cause in TRANSIENT_CAUSES if policy.get(cause) == "stop"]
        if stopping:
            raise ValueError(f"{', '.join(stopping)}: a transient the run recovered from only records; "
                             "valid policy: record")
        return policy

    @model_validator(mode="after")
    def _recovery_within_patience(self) -> DivergenceConfig:
        if self.grad_explosion_recovery > self.grad_explosion_patience:
            raise ValueError(
                f"grad_explosion_recovery: {self.grad_explosion_recovery} iterations exceeds "
                f"grad_explosion_patience ({self.grad_explosion_patience}): an episode would always be an "
                "explosion before it could recover; valid: 1 .. grad_explosion_patience")
        return self

    def action(self, cause: str) -> str:
        """'stop' or 'record' for this cause (unlisted causes stop, transients record)."""
        return "record" if cause in TRANSIENT_CAUSES else self.policy.get(cause, "stop")


class TrialConfig(StrictModel):
    """Everything one GAN training run needs. Units: iterations count generator updates."""

    # Data
    dataset: Literal[DATASETS] = "digits"
    data_root: str = "data"  # where the dataset lives on disk (ignored by the built-in digits)
    download: bool = False  # let torchvision download a missing dataset
    resolution: int = 32  # pixels per side of the training images
    celeba_split: Literal[CELEBA_SPLITS] = "all"  # CelebA only: all images as the paper, or one partition

    # Networks and normalization
    architecture: Literal[ARCHITECTURES] = "standard_cnn"
    width: float = Field(0.25, gt=0)  # channels x width: 1.0 is the paper's network, less for CPU studies
    z_dim: int = Field(128, ge=1)
    variant: Literal[VARIANTS] = "sn"  # discriminator normalization
    scale: float = 1.0  # the paper's constant c for ssn / bssn / strict_sn
    n_power_iterations: int = Field(1, ge=1)  # per training forward
    sn_grad_through_power_iteration: bool = True  # as the official BSN code; False: u, v constants as PyTorch

    # Loss and optimisation
    loss: Literal[LOSSES] = "hinge"  # wgan_gp by default for the learned-gamma variants (as the paper)
    gp_weight: float = Field(10.0, ge=0)  # lambda of WGAN-GP
    g_lr: float = 2e-4
    d_lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    n_dis: int = 1  # D steps per G step
    batch_size: int = 32  # the paper's is 64 (its presets set it); 32 keeps the quick CPU run quick
    # Images per D step (real, and as many fake) and latents per G step; None: batch_size (filled in at
    # validation). The paper's ImageNet runs use D 16, G 32 (fjxmlzn/BSN no_gamma-ResNet/config.py).
    d_batch_size: int | None = None
    g_batch_size: int | None = None
    iterations: int = Field(500, ge=1)  # generator iterations
    seed: int = 0

    # Schedule (in generator iterations)
    log_every: int = Field(50, ge=1)
    eval_every: int = Field(250, ge=1)
    checkpoint_every: int = Field(250, ge=1)

    # Metrics
    metrics: tuple[Literal[METRICS], ...] = ()  # empty: fd_digits for digits, else fid, is, kid
    eval_generated: int = Field(10_000, ge=2)  # the paper: 10k generated vs 5k real at each evaluation
    eval_real: int = Field(5_000, ge=2)
    # Generated images of IS, in 10 splits; None: eval_generated (filled in at validation). The paper's IS
    # draws 50k (fjxmlzn/BSN gan/metric.py), its own count beside FID's 10k.
    eval_generated_is: int | None = None
    # torch-fidelity's weights-inception-2015-12-05-6726825d.pth; None: the torch hub cache
    inception_weights: str | None = None
    cache_dir: str = "~/.cache/gan-stability"  # reference statistics and the digits feature extractor

    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)
    device: str = "auto"  # one of DEVICES; auto: cuda when available, else cpu
    # The fast trial: torch.compile the training forwards of G and D (on CUDA with CUDA graphs, mode
    # reduce-overhead, and fused Adam). Matches eager training within float tolerance (tests/test_train.py);
    # the first iterations pay the compilation (about a minute).
    compile: bool = False

    @field_validator("g_lr", "d_lr")
    @classmethod
    def _positive_lr(cls, lr: float) -> float:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"learning rate must be a finite number > 0, got {lr}")
        return lr

    @field_validator("beta1", "beta2")
    @classmethod
    def _beta_in_unit_interval(cls, beta: float) -> float:
        if not 0 <= beta < 1:
            raise ValueError(f"Adam beta must lie in [0, 1), got {beta}")
        return beta

    @field_validator("n_dis")
    @classmethod
    def _n_dis(cls, n_dis: int) -> int:
        if n_dis < 1:
            raise ValueError(f"n_dis must be >= 1, got {n_dis}")
        return n_dis

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, batch_size: int) -> int:
        check_batch_size(batch_size)
        return batch_size

    @field_validator(*SIZE_BOUNDS)
    @classmethod
    def _within_size_bound(cls, size: int | float | None, info: ValidationInfo) -> int | float | None:
        low, high = SIZE_BOUNDS[info.field_name]
        if size is not None and size > high:
            valid = f"{low} .. {high}" if isinstance(low, int) else f"> {low} and <= {high}"
            raise ValueError(f"{info.field_name}: {size!r} exceeds its upper bound; valid: {valid}")
        return size

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int) -> int:
        check_seed(seed)
        return seed

    @field_validator("device")
    @classmethod
    def _device_form(cls, device: str) -> str:
        check_device(device)
        return device

    @field_validator("d_batch_size", "g_batch_size", "eval_generated_is")
    @classmethod
    def _count_at_least_two(cls, count: int | None, info: ValidationInfo) -> int | None:
        if count is not None:  # a batch (or IS's images) compares at least two images, as batch_size
            check_batch_size(count, info.field_name)
        return count

    @model_validator(mode="before")
    @classmethod
    def _loss_follows_variant(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("variant") in GAMMA_VARIANTS and "loss" not in data:
            data = {**data, "loss": "wgan_gp"}
        return data

    @model_validator(mode="after")
    def _resolution_fits_architecture(self) -> TrialConfig:
        check_resolution(self.architecture, self.resolution)
        return self

    @model_validator(mode="after")
    def _scale_fits_variant(self) -> TrialConfig:
        check_scale(self.variant, self.scale)
        return self

    @model_validator(mode="after")
    def _unset_counts_follow_their_default(self) -> TrialConfig:
        """Unset d_batch_size, g_batch_size follow batch_size; an unset eval_generated_is, eval_generated."""
        for field, source in (("d_batch_size", "batch_size"), ("g_batch_size", "batch_size"),
                              ("eval_generated_is", "eval_generated")):
            if getattr(self, field) is None:
                self.__dict__[field] = getattr(self, source)  # not setattr: that would validate again
        return self

    @model_validator(mode="after")
    def _celeba_split_only_for_celeba(self) -> TrialConfig:
        if self.celeba_split != "all" and self.dataset != "celeba":
            raise ValueError(
                f"celeba_split: {self.celeba_split!r} applies to dataset celeba only (got dataset "
                f"{self.dataset!r}); leave it 'all'"
            )
        return self

    @model_validator(mode="after")
    def _windows_fit_the_run(self) -> TrialConfig:
        """A detector window chosen longer than the run could never fire: refuse it, naming the field.

        Only windows set away from their default are refused; a default one that a (short) run cannot hold
        leaves that detector idle, as `idle_detectors` says."""
        defaults = DivergenceConfig()
        problems = [message for fields, message in self._window_overflows()
                    if any(getattr(self.divergence, f) != getattr(defaults, f) for f in fields)]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def idle_detectors(self) -> list[str]:
        """One message per divergence window this run is too short to hold (that detector never fires)."""
        return [message for _, message in self._window_overflows()]

    @property
    def evaluations(self) -> int:
        """Evaluations of a run that is not stopped: every eval_every iterations and at the last one."""
        return math.ceil(self.iterations / self.eval_every)

    def _window_overflows(self) -> list[tuple[tuple[str, ...], str]]:
        """(the divergence fields that set the window, message) for each window longer than this run."""
        d, run, out = self.divergence, f"the run's iterations ({self.iterations})", []
        for field in ("grad_vanishing_patience", "d_saturation_patience"):
            steps = getattr(d, field)
            if steps * self.log_every > self.iterations:
                out.append(((field,), (
                    f"divergence.{field}: {steps} logging steps x log_every {self.log_every} = "
                    f"{steps * self.log_every} iterations exceeds {run}; valid at this log_every: "
                    + (f"1 .. {self.iterations // self.log_every}" if self.iterations >= self.log_every
                       else "none (lower log_every)"))))
        if d.grad_explosion_startup + d.grad_explosion_patience > self.iterations:
            out.append((("grad_explosion_startup", "grad_explosion_patience"), (
                "divergence.grad_explosion_startup + divergence.grad_explosion_patience: "
                f"{d.grad_explosion_startup} + {d.grad_explosion_patience} iterations exceeds {run}, so no "
                "explosion could be confirmed; valid: startup + patience <= iterations")))
        evaluations = f"the run's {self.evaluations} evaluations (iterations / eval_every, rounded up)"
        if d.fid_blowup_warmup_evals + d.fid_blowup_patience > self.evaluations:
            out.append((("fid_blowup_warmup_evals", "fid_blowup_patience"), (
                "divergence.fid_blowup_warmup_evals + divergence.fid_blowup_patience: "
                f"{d.fid_blowup_warmup_evals} + {d.fid_blowup_patience} evaluations exceeds {evaluations}; "
                f"valid: warmup + patience <= {self.evaluations}")))
        collapse_on = d.mode_collapse is not None or d.mode_collapse_classes is not None
        if collapse_on and d.mode_collapse_warmup_evals + d.mode_collapse_patience > self.evaluations:
            out.append((("mode_collapse_warmup_evals", "mode_collapse_patience"), (
                "divergence.mode_collapse_warmup_evals + divergence.mode_collapse_patience: "
                f"{d.mode_collapse_warmup_evals} + {d.mode_collapse_patience} evaluations exceeds "
                f"{evaluations}; valid: warmup + patience <= {self.evaluations}")))
        return out

    @property
    def metric_names(self) -> tuple[str, ...]:
        if self.metrics:
            return self.metrics
        return ("fd_digits",) if self.dataset == "digits" else ("fid", "is", "kid")

    @property
    def primary_metric(self) -> str:
        """The metric the study minimises and the blow-up rule watches."""
        return self.metric_names[0] if self.metric_names[0] != "is" else "fid"


class ConfigError(ValueError):
    """Bad trial configuration; the message names each offending field and its valid values."""


def parse_config(values: dict[str, Any] | TrialConfig) -> TrialConfig:
    """Validate a plain dict (from YAML, `--set` or a Ray Tune config) into a TrialConfig."""
    if isinstance(values, TrialConfig):
        return values
    try:
        return TrialConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        field = ".".join(str(part) for part in err["loc"])
        # Model-level messages, and the shared checks' (check_batch_size ...), name their field themselves.
        lines.append(message if not field or message.startswith(f"{field}: ") else f"{field}: {message}")
    return "invalid trial config:\n  " + "\n  ".join(lines)


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """values['a']['b'] = value for key 'a.b', creating the mappings on the way."""
    *parents, leaf = key.split(".")
    node = values
    for parent in parents:
        node = node.setdefault(parent, {})
    node[leaf] = value


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep merge: nested mappings are merged key by key, everything else replaced."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(pairs: list[str], example: str = "g_lr=1e-4") -> dict[str, Any]:
    """`--set` pairs ['n_dis=5', 'divergence.grad_explosion=1e3'] -> {'n_dis': 5, 'divergence':
    {'grad_explosion': 1e3}}; values are parsed as YAML. Raises ConfigError naming the bad pair."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set {example}")
        try:
            set_dotted(values, key, yaml.safe_load(raw))
        except (yaml.YAMLError, AttributeError, TypeError) as exc:  # TypeError: a dotted key through a scalar
            raise ConfigError(f"--set {pair!r}: cannot set {key}: {exc}") from None
    return values
