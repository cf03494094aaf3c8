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
    """ConfigError for a setting whose default is a number but whose value is not a finite one
    (``size=abc``, ``alpha=[1, 2]``, ``lr=1e400``; a whole number where the default is one), or whose
    default is true/false but whose value is not a boolean (``last_layer_only=False`` is the string
    "False"), before any constructor trips over it or silently misreads it."""
    import math

    for k, v in params.items():
        d = defaults.get(k)
        if isinstance(d, bool):  # "False" from a command line is a true string: say so, never read it as on
            if not isinstance(v, bool):
                raise ConfigError(f"{owner}: {k} must be true or false, got {v!r}")
        elif isinstance(d, (int, float)):
            try:
                if isinstance(v, bool):
                    raise TypeError
                f = float(v)
            except (TypeError, ValueError):
                raise ConfigError(f"{owner}: {k} must be a number, got {v!r}") from None
            if not math.isfinite(f):  # 1e400 parses as inf: it would run (and store) nonsense
                raise ConfigError(f"{owner}: {k} must be a finite number, got {v!r}")
            if isinstance(d, int) and f != int(f):
                raise ConfigError(f"{owner}: {k} must be a whole number, got {v!r}")
