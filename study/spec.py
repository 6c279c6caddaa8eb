"""A study spec: what to sweep, how to search, where to run and track. Validated whole before anything starts.

A spec is a YAML file or a shipped preset (study/presets/NAME.yaml). `load_spec(name_or_path, overrides)`
returns a `StudySpec`; `expand_grid(spec)` lists the trials of a grid study and `grid_packs(spec)` groups
them into packs of up to `pack_size` that train as one computation (trainables/packing.py). Every error is a
`StudyError` whose message names the field (`axes.g_lr`, `resources.gpu`, `base.n_dis`) and the valid values.

Axes are one of:
- a list of values: a grid axis (for random / Optuna search: a categorical choice);
- `{dist: loguniform|uniform, low, high}` or `{dist: randint, low, high}` (high inclusive) or
  `{dist: choice, values: [...]}`: a distribution, for random or Optuna search only;
- `{bundle: {LABEL: {field: value, ...}, ...}}`: named settings that move several fields together
  (Miyato et al.'s settings A-F; `variant: {bundle: {bssn: {variant: bssn, scale: 1.5}, ...}}`); the axis
  name is free, the bundle's keys must be trial-config fields.
An axis name is a trial-config field, dotted for nested ones (`divergence.grad_explosion`). Seeds are not an
axis of the spec: `seeds` gives the replicates of every cell.
"""

from __future__ import annotations

import itertools
import json
import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from study.layout import cell_key
from trainables.config import (
    PACK_MEMBER_FIELDS,
    PACKED_LOSSES,
    ConfigError,
    StrictModel,
    TrialConfig,
    check_seed,
    describe_validation_error,
    merge,
    parse_config,
    parse_overrides,
    set_dotted,
)

PRESETS_PACKAGE = "study.presets"
OBJECTIVES = ("objective", "diverged")  # what a search minimises: the primary metric, the divergence flag


class StudyError(ValueError):
    """Bad study spec or command line; the message names each offending field and its valid values."""


class LogUniform(StrictModel):
    dist: Literal["loguniform"]
    low: float = Field(gt=0)
    high: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> LogUniform:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self


class Uniform(StrictModel):
    dist: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self


class RandInt(StrictModel):
    dist: Literal["randint"]
    low: int
    high: int  # inclusive

    @model_validator(mode="after")
    def _ordered(self) -> RandInt:
        if not self.low <= self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


class Choice(StrictModel):
    dist: Literal["choice"]
    values: list[Any] = Field(min_length=1)


Distribution = Annotated[LogUniform | Uniform | RandInt | Choice, Field(discriminator="dist")]


class Bundle(StrictModel):
    bundle: dict[str, dict[str, Any]] = Field(min_length=1)  # label -> trial-config fields set together


def _axis_kind(value: Any) -> str | None:
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "bundle" if "bundle" in value else "dist" if "dist" in value else None
    if isinstance(value, Bundle):
        return "bundle"
    return "dist" if isinstance(value, LogUniform | Uniform | RandInt | Choice) else None


AXIS_SHAPES = "an axis is a list of values, {dist: loguniform|uniform|randint|choice, ...} or {bundle: {...}}"
Axis = Annotated[
    Annotated[list[Any], Tag("list")] | Annotated[Bundle, Tag("bundle")]
    | Annotated[Distribution, Tag("dist")],
    Discriminator(_axis_kind, custom_error_type="axis", custom_error_message=AXIS_SHAPES),
]


class SearchSpec(StrictModel):
    kind: Literal["grid", "random", "optuna"] = "grid"
    sampler: Literal["tpe", "cmaes"] = "tpe"  # Optuna's sampler (kind: optuna)
    objectives: list[Literal[OBJECTIVES]] = Field(default=["objective"], min_length=1, max_length=2)
    seed: int = 0  # the sampler's own seed, so that a search is reproducible

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int) -> int:
        check_seed(seed, "search.seed")  # numpy's range, which Optuna's samplers take
        return seed


class SchedulerSpec(StrictModel):
    kind: Literal["asha"] = "asha"  # fed the `objective` of evaluation reports only (always finite)
    grace_period: int = Field(1000, ge=1)  # generator iterations before a trial may be stopped
    reduction_factor: float = Field(3.0, gt=1)
    max_t: int | None = Field(None, ge=1)  # None: the trial's `iterations`


class ResourcesSpec(StrictModel):
    cpus: float = Field(1.0, gt=0)  # CPU cores per trial
    gpu: float | None = Field(None, gt=0, le=1)  # fraction of one GPU per trial (0.25: four trials per GPU)


class BudgetSpec(StrictModel):
    samples: int | None = Field(None, ge=1)  # points a random / Optuna search draws (each run for every seed)
    time_s: float | None = Field(None, gt=0)  # wall-clock budget of the whole study, seconds


class TrackingSpec(StrictModel):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str | None = None  # None: the study's name
    # Seconds a trial (and the driver, closing its runs) waits for an unreachable HTTP tracking server's
    # /health before its call fails; on top of MLflow's own retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES).
    outage_wait_s: float = Field(600.0, ge=0)


class StudySpec(StrictModel):
    """One study: the base trial config, the axes swept over it, and how and where to run it."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)  # trial-config fields shared by every trial
    axes: dict[str, Axis] = Field(default_factory=dict)  # one product of axes ...
    grids: list[dict[str, Axis]] | None = None  # ... or a union of several (a grid study only)
    seeds: list[int] = Field(default=[0], min_length=1)  # replicates of every cell; an int n means 0..n-1
    search: SearchSpec = Field(default_factory=SearchSpec)
    scheduler: SchedulerSpec | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_concurrent: int | None = Field(None, ge=1)  # None: as many as the resources allow
    max_failures: int = Field(2, ge=0)  # retries of a failed trial, each from its last checkpoint
    pack_size: int = Field(1, ge=1)  # grid only: up to this many compatible trials train as one Ray trial
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage: str | None = None  # Ray results: local/NFS path or s3://; None: $GAN_STABILITY_STORAGE or ./runs

    @field_validator("seeds", mode="before")
    @classmethod
    def _count_means_range(cls, seeds: Any) -> Any:
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            if seeds < 1:
                raise ValueError(f"a seed count must be >= 1, got {seeds}")
            return list(range(seeds))
        return seeds

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        for seed in seeds:
            check_seed(seed, "seeds")
        return seeds

    @property
    def axis_sets(self) -> list[dict[str, Axis]]:
        """The grids of the study: `grids` when given, else the single product `axes`."""
        return self.grids if self.grids is not None else [self.axes]

    @property
    def axis_names(self) -> list[str]:
        """Swept axes in declaration order, `seed` last when there are several seeds."""
        names = list(dict.fromkeys(name for axes in self.axis_sets for name in axes))
        return names + ["seed"] if len(self.seeds) > 1 else names

    @property
    def objectives(self) -> list[str]:
        return list(self.search.objectives)


def trial_fields() -> set[str]:
    """Every trial-config field a spec may set, dotted for the nested divergence fields."""
    fields = set(TrialConfig.model_fields)
    nested = TrialConfig.model_fields["divergence"].annotation.model_fields
    fields |= {f"divergence.{name}" for name in nested}
    return fields


def axis_values(axis: Axis) -> list[Any]:
    """The values (or bundle labels) a grid walks through; a distribution has none."""
    if isinstance(axis, list):
        return axis
    if isinstance(axis, Bundle):
        return list(axis.bundle)
    raise TypeError(f"{type(axis).__name__} is a distribution, not a grid axis")


def point_overrides(spec: StudySpec, point: dict[str, Any]) -> dict[str, Any]:
    """Trial-config fields set by one point {axis: value or bundle label} of the study (nested by dots)."""
    bundles: dict[str, dict[str, dict[str, Any]]] = {}  # axis -> label -> fields, over every grid of a union
    for axes in spec.axis_sets:
        for name, axis in axes.items():
            if isinstance(axis, Bundle):
                bundles.setdefault(name, {}).update(axis.bundle)
    overrides: dict[str, Any] = {}
    for name, value in point.items():
        fields = bundles[name][value] if name in bundles else {name: value}
        for field, field_value in fields.items():
            set_dotted(overrides, field, field_value)
    return overrides


def trial_config(spec: StudySpec, point: dict[str, Any], seed: int) -> TrialConfig:
    """The validated TrialConfig of one trial: base, then the point's axes, then the seed."""
    return parse_config(merge(merge(spec.base, point_overrides(spec, point)), {"seed": seed}))


def expand_grid(spec: StudySpec) -> list[tuple[dict[str, Any], int]]:
    """Every (point, seed) of a grid study: each grid's product of axes, each point for every seed."""
    points: list[dict[str, Any]] = []
    for axes in spec.axis_sets:
        names = list(axes)
        for values in itertools.product(*(axis_values(axes[name]) for name in names)):
            point = dict(zip(names, values, strict=True))
            if point not in points:  # grids of a union may overlap; each cell runs once
                points.append(point)
    return [(point, seed) for point in points for seed in spec.seeds]


def grid_packs(spec: StudySpec) -> list[list[tuple[dict[str, Any], int]]]:
    """The grid's trials in packs of up to `pack_size`, each pack one computation (trainables/packing.py).

    Trials pack together when their configs differ only in PACK_MEMBER_FIELDS (learning rates, betas, scale,
    seed) and their loss packs; any other trial is a pack of one. Grid order is kept within each group.
    """
    groups: dict[str, list[tuple[dict[str, Any], int]]] = {}
    for index, (point, seed) in enumerate(expand_grid(spec)):
        config = trial_config(spec, point, seed)
        if spec.pack_size > 1 and config.loss in PACKED_LOSSES:
            key = json.dumps(config.model_dump(mode="json", exclude=set(PACK_MEMBER_FIELDS)), sort_keys=True)
        else:
            key = f"alone {index}"
        groups.setdefault(key, []).append((point, seed))
    return [members[start:start + spec.pack_size] for members in groups.values()
            for start in range(0, len(members), spec.pack_size)]


def corner_points(spec: StudySpec) -> list[tuple[str, dict[str, Any]]]:
    """(axis, point) pairs that test each axis's every listed value and each distribution's bounds alone."""
    corners = []
    for axes in spec.axis_sets:
        for name, axis in axes.items():
            if isinstance(axis, list | Bundle):
                values = axis_values(axis)
            elif isinstance(axis, Choice):
                values = axis.values
            else:
                values = [axis.low, axis.high]
            corners += [(name, {name: value}) for value in values]
    return corners


def validate_study(spec: StudySpec) -> None:
    """Check what pydantic cannot see field by field; raise StudyError naming the field."""
    errors = []
    fields = trial_fields()
    if spec.grids is not None and spec.axes:
        errors.append("grids: give either `axes` or `grids`, not both")
    if spec.grids is not None and spec.search.kind != "grid":
        errors.append(f"grids: a union of grids needs search.kind grid, got {spec.search.kind!r}")
    for where, axes in _named_axis_sets(spec):
        for name, axis in axes.items():
            field = f"{where}.{name}"
            if name == "seed":
                errors.append(f"{field}: seeds are not an axis; set `seeds` (a count or a list)")
            elif isinstance(axis, Bundle):
                errors += [f"{field}.bundle.{label}.{key}: unknown trial-config field"
                           for label, values in axis.bundle.items() for key in values if key not in fields]
            elif name not in fields:
                errors.append(f"{field}: unknown trial-config field; valid: {', '.join(sorted(fields))}")
            if isinstance(axis, list) and not axis:
                errors.append(f"{field}: an axis needs at least one value, got an empty list")
            if not isinstance(axis, list | Bundle) and spec.search.kind == "grid":
                errors.append(f"{field}: a distribution needs search.kind random or optuna, not grid")
    labels: dict[tuple[str, str], dict[str, Any]] = {}
    for where, axes in _named_axis_sets(spec):
        for name, axis in axes.items():
            for label, values in (axis.bundle.items() if isinstance(axis, Bundle) else ()):
                if labels.setdefault((name, label), values) != values:
                    errors.append(f"{where}.{name}.bundle.{label}: differs from that label in another grid")
    if errors:
        raise StudyError(_paragraph(spec.name, errors))

    search = spec.search
    if search.kind == "optuna" and search.sampler == "cmaes" and len(search.objectives) > 1:
        errors.append("search.sampler: cmaes optimises a single objective; use tpe for objectives "
                      f"{search.objectives}")
    if search.kind == "optuna" and search.sampler == "cmaes" and any(
            isinstance(axis, Bundle | Choice) or (isinstance(axis, list) and not _numeric(axis))
            for axis in spec.axes.values()):
        errors.append("search.sampler: cmaes samples numbers only; categorical axes need sampler tpe")
    if search.kind != "grid" and spec.budget.samples is None and spec.budget.time_s is None:
        errors.append(f"budget: a {search.kind} search needs budget.samples or budget.time_s")
    if search.kind == "grid" and spec.budget.samples is not None:
        errors.append("budget.samples: a grid runs each of its cells; samples applies to random or optuna")
    if spec.pack_size > 1 and search.kind != "grid":
        errors.append(f"pack_size: packs are formed from a grid's cells; a {search.kind} search suggests one "
                      "trial at a time, so it needs pack_size 1")
    if spec.pack_size > 1 and spec.scheduler is not None:
        errors.append("pack_size: ASHA stops whole Ray trials, not the members of a pack; drop the scheduler "
                      "or use pack_size 1")
    if spec.scheduler is not None and len(search.objectives) > 1:
        errors.append("scheduler: ASHA stops trials on one metric; drop it for a multi-objective search")
    if errors:
        raise StudyError(_paragraph(spec.name, errors))

    # Every trial's config must validate: the grid's every trial, or each search axis's values and bounds.
    try:
        base = parse_config(merge(spec.base, {"seed": spec.seeds[0]}))
    except ConfigError as exc:
        raise StudyError(_paragraph(spec.name, [_prefixed("base", str(exc))])) from None
    trials = expand_grid(spec) if search.kind == "grid" else [(point, spec.seeds[0])
                                                              for _, point in corner_points(spec)]
    failing: dict[str, list[str]] = {}  # error -> the cells that raise it: one line per distinct error
    for point, seed in trials:
        try:
            config = trial_config(spec, point, seed)
        except ConfigError as exc:
            failing.setdefault(_prefixed("", str(exc)), []).append(cell_key(point) or "(base)")
            continue
        if config.checkpoint_every % config.eval_every:
            errors.append(f"base.checkpoint_every: {config.checkpoint_every} must be a multiple of "
                          f"eval_every ({config.eval_every}), so that each checkpoint reaches Ray Tune "
                          f"with an objective (trial {cell_key(point) or '(base)'})")
    for message, cells in failing.items():
        more = f" and {len(cells) - 1} more" if len(cells) > 1 else ""
        errors.append(f"{message} (trial {cells[0]}{more})")
    if spec.pack_size > 1 and base.compile:
        errors.append("pack_size: a pack runs uncompiled, as one vmap over its members; set base.compile "
                      "false or pack_size 1")
    if spec.scheduler is not None and spec.scheduler.grace_period > base.iterations:
        errors.append(f"scheduler.grace_period: {spec.scheduler.grace_period} exceeds base.iterations "
                      f"({base.iterations})")
    if errors:
        raise StudyError(_paragraph(spec.name, list(dict.fromkeys(errors))))


def _named_axis_sets(spec: StudySpec) -> list[tuple[str, dict[str, Axis]]]:
    if spec.grids is None:
        return [("axes", spec.axes)]
    return [(f"grids.{index}", axes) for index, axes in enumerate(spec.grids)]


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _prefixed(where: str, message: str) -> str:
    """ConfigError lines (`n_dis: ...`) prefixed by where they come from: `base.n_dis: ...`."""
    lines = [line.strip() for line in message.splitlines()[1:] if line.strip()]
    return "; ".join(f"{where}.{line}" if where else line for line in lines)


def _paragraph(name: str, errors: list[str]) -> str:
    return f"invalid study {name!r}: " + "; ".join(errors)


def preset_names() -> list[str]:
    return sorted(entry.name.removesuffix(".yaml") for entry in resources.files(PRESETS_PACKAGE).iterdir()
                  if entry.name.endswith(".yaml"))


class UniqueKeyLoader(yaml.SafeLoader):
    """Safe loading that refuses a key given twice in one mapping (PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Explicit keys only: a `<<` merge key's entries may be overridden, that is what it is for.
        keys = [self.construct_object(key, deep=True) for key, _ in node.value
                if key.tag != "tag:yaml.org,2002:merge"]
        repeated = sorted({str(key) for key in keys if keys.count(key) > 1})
        if repeated:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key(s) {', '.join(repeated)} in one mapping", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_spec_file(name_or_path: str) -> tuple[dict[str, Any], str]:
    """The raw mapping of a preset name or a YAML path, and the preset name ("" for a file)."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise StudyError(f"--study {name_or_path}: no such file")
        try:
            text, preset = path.read_text(encoding="utf-8"), ""
        except (OSError, UnicodeDecodeError) as exc:
            raise StudyError(f"--study {name_or_path}: cannot read it as UTF-8 text ({exc})") from None
    elif name_or_path in preset_names():
        preset = name_or_path
        text = resources.files(PRESETS_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text()
    else:
        raise StudyError(f"--study {name_or_path!r}: unknown preset and not a YAML file; "
                         f"presets: {', '.join(preset_names())}")
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise StudyError(f"--study {name_or_path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"--study {name_or_path}: expected a mapping of study fields, "
                         f"got {type(raw).__name__}")
    return raw, preset


def load_spec(name_or_path: str, overrides: list[str] = ()) -> tuple[StudySpec, str]:
    """Read, override (`--set base.n_dis=5`, values parsed as YAML), validate.

    Returns (spec, preset name or "" for a file); raises StudyError.
    """
    raw, preset = read_spec_file(name_or_path)
    try:
        raw = merge(raw, parse_overrides(list(overrides), example="base.iterations=200"))
    except ConfigError as exc:
        raise StudyError(str(exc)) from None
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as exc:
        message = describe_validation_error(exc).removeprefix("invalid trial config:\n  ")
        name = raw.get("name", name_or_path)
        raise StudyError(_paragraph(str(name), message.split("\n  "))) from None
    validate_study(spec)
    return spec, preset
