"""The base of every config section, and the error a bad config raises (imported by config.py and
algorithm_config.py, so neither imports the other's internals)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config that cannot be used; the message names the source and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
