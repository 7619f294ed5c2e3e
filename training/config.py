"""YAML run configs, validated by pydantic models with messages that name the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from aptp.formats.files import validation_problems

Config = TypeVar("Config", bound=BaseModel)


class ConfigError(ValueError):
    """A config file is missing, not YAML, or has invalid fields."""


def load_config(path: str | Path, model: type[Config], overrides: dict | None = None) -> Config:
    """Read and validate a YAML config; `overrides` maps dotted field paths (`optim.steps`) to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        target = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {validation_problems(e, limit=20)}") from None
