"""Errors the library raises on bad input.

Every error a user can cause derives from :class:`BdftError`, so a UI or the CLI can catch one type
and show its message as is: each message says what was wrong and what to do about it.
"""


class BdftError(Exception):
    """Base class: a problem with the user's input, data or stored runs (not a bug in bdft)."""


class ConfigError(BdftError, ValueError):
    """An invalid parameter: unknown name, value out of range, trigger larger than the image, ..."""


class DatasetNotFound(BdftError, FileNotFoundError):
    """A dataset is not on disk and cannot be downloaded (offline or download disabled)."""


class CheckpointError(BdftError):
    """A checkpoint is corrupt, truncated, not safetensors, or does not fit the model."""


class RunNotFound(BdftError, KeyError):
    """No stored run has the given id."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else "run not found"


def check_numbers(owner: str, defaults: dict, params: dict) -> None:
    """ConfigError for a setting whose default is a number but whose value is not one (``size=abc``
    or ``alpha=[1, 2]`` from the command line), before any constructor trips over it with a bare
    ValueError or TypeError."""
    for k, v in params.items():
        d = defaults.get(k)
        if isinstance(d, (int, float)) and not isinstance(d, bool):
            try:
                float(v)
            except (TypeError, ValueError):
                raise ConfigError(f"{owner}: {k} must be a number, got {v!r}") from None
