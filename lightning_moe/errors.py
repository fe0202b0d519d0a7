"""Errors the command line reports as one line."""


class ConfigError(ValueError):
    """A configuration value that is well typed but not allowed. The message names the override key."""
