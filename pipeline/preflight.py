"""Pre-flight: the checks of a run config that need the implementations, run before Ray starts.

pipeline/config.py holds names and types only and imports no implementation; what it cannot check is checked
here, against the reward component library: every component in use names a known type, and its options are
valid for that type (a python component's function is imported: its module's top-level code runs). Every entry
point runs `check` before any actor exists, so a bad config stays one line naming its key: the CLI (through
`load_config`), `train()` (so a resume and every Tune trial too), tune (the base config and each searched
value), `tokenforge eval` and the RLlib env.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from pipeline import config as configs
from pipeline.algorithm.advantages import check_known
from pipeline.config import TrainConfig, first_error
from pipeline.errors import ConfigError, TokenforgeError
from pipeline.rewards.components import COMPONENTS


def check(config: TrainConfig) -> TrainConfig:
    """`config`, once every reward component in use is known and its options valid; else ConfigError naming the
    key (the components in use come in config order: the weighted ones, then the eval metrics)."""
    specs = config.reward.components
    for name in dict.fromkeys([*config.reward.weights, *config.trainer.eval_metrics]):
        spec = specs.get(name)  # absent only when the config was changed after validation
        if spec is None or (spec.type == name and name not in COMPONENTS):  # a component's type defaults to its name
            where = "reward.weights" if name in config.reward.weights else "trainer.eval_metrics"
            raise ConfigError(
                f"config key {where!r}: component {name!r} names no component type "
                f"(types: {', '.join(sorted(COMPONENTS))}); "
                f"add reward.components.{name} with one of these types"
            )
        try:
            check_known(f"reward.components.{name}.type", spec.type, COMPONENTS)
        except ValueError as error:
            raise ConfigError(f"config key 'reward.components.{name}.type': {error}") from None
        try:
            COMPONENTS[spec.type].Options.model_validate(spec.options())
        except ValidationError as error:
            unknown = f"unknown option of component type {spec.type!r}"
            raise first_error(error, "config key", (f"reward.components.{name}",), unknown) from None
        except TokenforgeError as error:
            raise ConfigError(f"config key 'reward.components.{name}': {error}") from None
    return config


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (optional) + dotted overrides -> a TrainConfig validated and checked (config.load_config, then
    `check`)."""
    return check(configs.load_config(path, overrides))
