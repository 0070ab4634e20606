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


class SealError(PtqbenchError):
    """A calibrated model breaks the evaluation rule: a site still off that its method did not
    declare as an FP site (`Method.fp_sites`)."""


class CellError(PtqbenchError):
    """A cell of the grid failed with an unexpected exception; the message names the cell and
    where its traceback was written."""
