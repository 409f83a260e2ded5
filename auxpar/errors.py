"""Errors a user can cause.

Every exception here carries a message that names the problem and the fix. The CLI catches
:class:`AuxparError`, prints the message once (no traceback) and exits with ``exit_code``.
Anything else is a bug and keeps its traceback.
"""


class AuxparError(Exception):
    """Base class for user-facing errors (bad config, missing data, wrong world size...)."""

    exit_code = 2
    same_on_every_rank = False
    """True when every rank raises the same error (a bad config): only rank 0 prints it."""


class ConfigError(AuxparError):
    """A configuration value, flag or TOML key is wrong. The message names the key and the fix."""

    same_on_every_rank = True


class DataError(AuxparError):
    """A dataset is missing, corrupt, unsafe or cannot be downloaded."""

    exit_code = 3


class TrainingError(AuxparError):
    """Training cannot go on (NaN/inf loss, diverged state)."""

    exit_code = 4


class DistributedError(AuxparError):
    """The process layout does not match the config (world size vs stages, backend...)."""

    same_on_every_rank = True
