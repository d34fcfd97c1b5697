"""The configuration error (its own module: the data-source parsing raises it too, without a cycle)."""


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names its source and the key."""
