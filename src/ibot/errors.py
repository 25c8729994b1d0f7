"""User-facing errors: each one is printed by the CLI as a single line naming the culprit."""

from __future__ import annotations


class IBOTError(Exception):
    """Base class of errors caused by user input (config, files), not by bugs."""


class ConfigError(IBOTError):
    """A config file, key or value is invalid."""


class DataError(IBOTError):
    """An input path is missing, empty or unusable."""


class NonFiniteLossError(IBOTError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


class CheckpointWriteError(IBOTError):
    """A checkpoint could not be written (disk full, I/O error); the previous one is intact."""


class ExportError(IBOTError):
    """A backbone cannot be written in the format asked for, or its written copy failed the check."""
