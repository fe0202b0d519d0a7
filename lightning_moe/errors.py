"""Errors the command line reports as one line."""


class ConfigError(ValueError):
    """A configuration value that is well typed but not allowed. The message names the override key."""


class PathNotFoundError(ConfigError, FileNotFoundError):
    """A configured file, folder or pattern that finds nothing. The message names the override key."""
