"""Validated YAML configuration for mimo-voice."""

from .loader import CONFIG_DIR, ConfigError, dump_config, load_config, resolve_config_path
from .schema import Config

__all__ = ["CONFIG_DIR", "Config", "ConfigError", "dump_config", "load_config", "resolve_config_path"]
