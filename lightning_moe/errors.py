"""Errors the command line reports as one line."""


class ConfigError(ValueError):
    """A configuration value that is well typed but not allowed. The message names the override key."""


class DataNotFoundError(ConfigError, FileNotFoundError):
    """A configured data file or pattern that finds nothing. The message names the override key."""
