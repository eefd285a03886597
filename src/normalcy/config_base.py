"""What every params section shares; apart from config.py so section groups can live in modules
of their own (config_monitoring.py) without importing config.py back."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """params.yaml (or a --set override) is wrong; the message names the key path."""


class Section(BaseModel):
    """A params.yaml section: an unknown key or a wrong value fails, naming its path."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
