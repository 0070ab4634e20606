"""Typed errors raised by the library; only the CLI turns them into one line and exit code 2."""


class PtqbenchError(Exception):
    """Base class of every error ptqbench raises on purpose."""


class ConfigError(PtqbenchError):
    """A bad option: unknown name, impossible bit width, conflicting flags."""


class UnknownNameError(ConfigError):
    """A registry lookup failed; the message lists the valid names and a suggestion."""


class DataError(PtqbenchError):
    """Missing or malformed data: dataset folders, annotation files, prompt files."""


class CheckpointError(PtqbenchError):
    """A checkpoint is missing, truncated, corrupt or does not match its expected hash."""
