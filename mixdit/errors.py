"""The one error type users see: it says which field was wrong and what is allowed."""


class MixditError(Exception):
    """Base class for user-facing mixdit errors (the CLI prints these in one line, exit code 2)."""


class ConfigError(MixditError, ValueError):
    """A configuration value is outside what is allowed.

    ``ConfigError("vmoba.threshold", 1.5, "a number in [0, 1]")`` reads
    ``vmoba.threshold = 1.5 is not allowed: expected a number in [0, 1]``.
    """

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field} = {value!r} is not allowed: expected {allowed}")


class ModelNotFoundError(MixditError):
    """``load_pipeline`` could not find or load the named model."""


class UnsupportedModelError(MixditError):
    """A feature was applied to a model family it does not support."""
