"""User-facing errors: one clear line (what was wrong, what to do), non-zero exit."""


class UserError(Exception):
    """Bad input from the user: printed as one line on stderr by ``run.py``, exit code 2."""


class DataError(UserError):
    """Missing or malformed data files."""


class ModelLoadError(UserError):
    """A model or tokenizer could not be loaded (usually: no network for a hub id)."""


class ConfigError(UserError):
    """A configuration value that composes but cannot be used."""
