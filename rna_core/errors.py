"""User-facing errors.

Every mistake a user can make (bad config, unknown norm spec, missing dataset, checkpoint that
does not fit the model) raises a subclass of :class:`RnaError`. The job entry points catch it,
print its one-line message and exit with code 2; nothing else is caught, so real bugs still show
their traceback.
"""

from __future__ import annotations


class RnaError(Exception):
    """Base class of errors whose message is meant for the user (one line: what and what to do)."""


class ConfigError(RnaError, ValueError):
    """A configuration value or norm/attack/model spec is invalid."""


class DatasetNotFoundError(RnaError, FileNotFoundError):
    """A dataset is not where the configuration says it is."""


class CheckpointMismatchError(RnaError):
    """A checkpoint was written for a different model, space or config."""
