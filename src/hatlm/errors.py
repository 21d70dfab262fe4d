"""Errors meant for the person at the keyboard: the CLI prints them as one line, no traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input (a path, a file, a flag value): the message says what was wrong and what was expected."""


class ConfigError(UserError):
    """A configuration value (or a config.json) that hatlm cannot use."""


class CheckpointError(UserError):
    """A checkpoint folder that cannot be loaded: missing files, wrong names or shapes, .bin only, ..."""
