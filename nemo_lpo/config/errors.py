"""The configuration errors (their own module: the data-source parsing raises them too, without a cycle)."""

import json


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names its source and the key."""


class PreflightError(ConfigError):
    """A start-up mistake found on disk or in the launch (``nemo_lpo.train.preflight``): ``setting=value: problem; fix``."""

    def __init__(self, setting: str, value, problem: str, fix: str) -> None:
        self.setting = setting
        shown = json.dumps(value) if isinstance(value, list | bool) or value is None else str(value)
        super().__init__(f"{setting}={shown}: {problem}; {fix}")
