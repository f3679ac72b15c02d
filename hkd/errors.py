"""User-facing errors: the CLI prints these as one clear message, never as a traceback."""


class HkdError(Exception):
    """A problem with the user's input (config, model directory, data file, plugin)."""


class ConfigError(HkdError):
    """A config key, value or schedule is invalid; the message names its dotted path."""


class StoppedEarly(HkdError):
    """SIGINT/SIGTERM: the run finished its step, saved a checkpoint and stopped (exit code 130)."""
