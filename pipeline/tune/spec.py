"""The `tokenforge tune` spec: a base train config, a search space over dotted config keys, a `tune:` block.

    base:
      config: examples/words.yaml          # optional train YAML
      overrides: {trainer.total_steps: 200} # optional dotted keys
    search:
      reward.weights.digit_match: {strategy: uniform, values: [0.0, 1.0]}
      learner.lr: {strategy: loguniform, values: [1.0e-4, 1.0e-3]}
    tune:
      metric: eval/exact_match
      mode: max
      num_samples: 8
      scheduler: {name: asha, grace_period: 2}

Everything is validated here, before any trial starts (docs/tuning.md explains each key).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

from pipeline.algorithm.advantages import check_known
from pipeline.config import StorageUri, TrainConfig, apply_override, config_with, first_error, parse_override, read_yaml
from pipeline.errors import ConfigError
from pipeline.preflight import check, load_config

# strategy -> (number of values or None for a non-empty list, Tune domain)
STRATEGIES = {
    "uniform": (2, lambda v: tune.uniform(*v)),
    "loguniform": (2, lambda v: tune.loguniform(*v)),
    "quniform": (3, lambda v: tune.quniform(*v)),
    "randint": (2, lambda v: tune.randint(*v)),  # low inclusive, high exclusive
    "choice": (None, lambda v: tune.choice(v)),
    "grid": (None, lambda v: tune.grid_search(v)),
}
# search_alg -> (Ray module and class, the library it needs)
SEARCH_ALGS = {
    "random": None,
    "optuna": ("ray.tune.search.optuna", "OptunaSearch", "optuna"),
    "hyperopt": ("ray.tune.search.hyperopt", "HyperOptSearch", "hyperopt"),
    "bayesopt": ("ray.tune.search.bayesopt", "BayesOptSearch", "bayes_opt"),
}
SCHEDULERS = {"fifo": FIFOScheduler, "asha": ASHAScheduler, "pbt": PopulationBasedTraining, "pb2": None}
SET_BY_TOKENFORGE = {"metric", "mode", "time_attr", "hyperparam_mutations", "hyperparam_bounds"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dimension(Strict):
    strategy: str
    values: list

    @model_validator(mode="after")
    def well_formed(self) -> Dimension:
        check_known("strategy", self.strategy, STRATEGIES)
        count, _ = STRATEGIES[self.strategy]
        if count is None and not self.values:
            raise ValueError(f"{self.strategy} needs a non-empty list of values")
        if count is not None:
            if len(self.values) != count or not all(isinstance(v, (int, float)) for v in self.values):
                raise ValueError(f"{self.strategy} needs {count} numbers: [low, high{', q' if count == 3 else ''}]")
            if self.values[0] >= self.values[1]:
                raise ValueError(f"{self.strategy}: low must be below high")
            if self.strategy == "loguniform" and self.values[0] <= 0:
                raise ValueError("loguniform: low must be > 0")
        return self

    def domain(self):
        return STRATEGIES[self.strategy][1](self.values)

    def example(self) -> Any:
        """A value this dimension can take (to type-check the key before any trial)."""
        return self.values[0]


class Base(Strict):
    config: str | None = None
    overrides: dict[str, Any] = {}


class SchedulerSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = "fifo"


class TuneBlock(Strict):
    metric: str = "eval/exact_match"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    search_alg: str = "random"
    scheduler: SchedulerSpec = SchedulerSpec()
    storage_path: StorageUri = "tune_results"
    name: str = "tokenforge"
    max_failures: int = Field(0, ge=-1)
    num_to_keep: int | None = Field(2, ge=1)
    driver_cpus: float = Field(0.25, gt=0)


class TuneSpec(Strict):
    base: Base = Base()
    search: dict[str, Dimension] = Field(min_length=1)
    tune: TuneBlock = TuneBlock()


def load_spec(path: str | Path, overrides: list[str] = ()) -> tuple[TuneSpec, TrainConfig]:
    """Spec file + dotted overrides (e.g. tune.num_samples=4) -> validated spec and base config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tune spec {str(path)!r} does not exist")
    data = read_yaml(path.read_text(), str(path), "tune spec") or {}
    for text in overrides:
        apply_override(data, *parse_override(text))
    try:
        spec = TuneSpec.model_validate(data)
    except ValidationError as error:
        raise first_error(error, "tune spec key") from None
    base_file = spec.base.config
    if base_file and not Path(base_file).is_absolute():
        base_file = str(path.parent / base_file) if (path.parent / base_file).is_file() else base_file
    base = absolute_local_paths(check(config_with(load_config(base_file), spec.base.overrides)))
    check_search(spec, base)
    check_objective(spec, base)
    scheduler(spec)
    searcher(spec)
    return spec, base


def absolute_local_paths(base: TrainConfig) -> TrainConfig:
    """Relative model and data paths that exist here, made absolute: Tune runs each trial in its own working
    directory (its trial folder), where a path relative to this one would name nothing."""
    keys = {
        "model.path": base.model.path,
        "model.chat_template": base.model.chat_template,
        "data.train_file": base.data.train_file,
        "data.eval_file": base.data.eval_file,
        "critic.model_path": base.critic.model_path if base.critic else None,
    }
    found = {k: os.path.abspath(v) for k, v in keys.items() if v and not Path(v).is_absolute() and Path(v).exists()}
    return config_with(base, found) if found else base


def check_search(spec: TuneSpec, base: TrainConfig) -> None:
    effective = base.model_dump(mode="json")
    for key, dimension in spec.search.items():
        node = effective
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(
                    f"search key {key!r}: the base config has no such key (see `tokenforge train --help-config`)"
                )
            node = node[part]
        if isinstance(node, dict):
            raise ConfigError(f"search key {key!r} is a section; search over one of its keys")
        try:
            check(config_with(base, {key: dimension.example()}))
        except ConfigError as error:
            raise ConfigError(f"search key {key!r}: {error}") from None
    if spec.tune.search_alg != "random" and any(d.strategy == "grid" for d in spec.search.values()):
        raise ConfigError(f"search strategy 'grid' only works with search_alg random, not {spec.tune.search_alg!r}")


def check_objective(spec: TuneSpec, base: TrainConfig) -> None:
    metric = spec.tune.metric
    reward_searched = any(k.startswith(("reward.weights", "reward.components")) for k in spec.search)
    if metric.startswith("reward/") and reward_searched:
        raise ConfigError(
            f"tune.metric {metric!r}: the reward weights are searched, so each trial's reward is on its own scale "
            "and trials cannot be compared by it (the search would favour large weights); "
            "optimise a held-out eval metric such as eval/exact_match"
        )
    if not base.data.evaluates:
        raise ConfigError(
            "tune.metric: trials are compared on held-out prompts, but the base config has none; set data.eval_file"
        )
    known = [f"eval/{name}" for name in base.trainer.eval_metrics]
    if metric not in known:
        raise ConfigError(
            f"tune.metric {metric!r}: the objective must be a held-out eval metric the base config reports "
            f"({', '.join(known)}); add its component to trainer.eval_metrics"
        )


def scheduler(spec: TuneSpec):
    """The Tune scheduler of the spec, with its options checked by name."""
    block = spec.tune
    name, options = block.scheduler.name, dict(block.scheduler.model_extra or {})
    known("tune.scheduler.name", name, SCHEDULERS)
    if name == "pb2":
        for library in ("GPy", "sklearn"):
            require(library, "scheduler 'pb2'")
        from ray.tune.schedulers.pb2 import PB2 as cls
    else:
        cls = SCHEDULERS[name]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"} - SET_BY_TOKENFORGE
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"tune.scheduler.{key}: not an option of scheduler {name!r} (options: {', '.join(sorted(allowed))})"
            )
    if name == "pbt":
        options["hyperparam_mutations"] = {k: mutation(k, d) for k, d in spec.search.items()}
    if name == "pb2":
        for key, d in spec.search.items():
            if d.strategy not in ("uniform", "loguniform", "quniform"):
                raise ConfigError(f"search key {key!r}: pb2 searches continuous ranges only, not {d.strategy!r}")
        options["hyperparam_bounds"] = {k: d.values[:2] for k, d in spec.search.items()}
    if name != "fifo":
        options["time_attr"] = "training_iteration"
    return cls(**options)


def mutation(key: str, dimension: Dimension):
    """PBT's resampling space for a searched key: the list itself for choice/grid, else the Tune domain."""
    return list(dimension.values) if dimension.strategy in ("choice", "grid") else dimension.domain()


def searcher(spec: TuneSpec):
    name = spec.tune.search_alg
    known("tune.search_alg", name, SEARCH_ALGS)
    if SEARCH_ALGS[name] is None:
        return None
    module, cls, library = SEARCH_ALGS[name]
    require(library, f"search_alg {name!r}")
    return getattr(importlib.import_module(module), cls)()


def known(kind: str, name: str, registry) -> None:
    try:
        check_known(kind, name, registry)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def require(library: str, what: str) -> None:
    if importlib.util.find_spec(library) is None:
        package = {"bayes_opt": "'bayesian-optimization<2'", "sklearn": "scikit-learn"}.get(
            library, library
        )  # Ray 2.60 needs 1.x
        raise ConfigError(f"{what} needs the `{package}` package: pip install {package}")


def param_space(spec: TuneSpec) -> dict[str, Any]:
    return {key: dimension.domain() for key, dimension in spec.search.items()}
