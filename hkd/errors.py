"""User-facing errors: the CLI prints these as one clear message, never as a traceback."""


class HkdError(Exception):
    """A problem with the user's input (config, model directory, data file, plugin)."""


class ConfigError(HkdError):
    """A config key, value or schedule is invalid; the message names its dotted path."""


class StoppedEarly(HkdError):
    """SIGINT/SIGTERM: the run finished its step, saved a checkpoint and stopped (exit code 130)."""



_deferred: list[str] | None = None  # warnings held back while a command validates (hkd.cli)


def warn(message: str) -> None:
    """A harmless problem with the user's input (an option that is ignored): one ``hkd: warning: ...`` line
    on stderr, and the command goes on. Under :func:`defer_warnings` it waits for :func:`flush_warnings`."""
    if _deferred is not None:
        _deferred.append(message)
        return
    import sys

    print(f"hkd: warning: {message}", file=sys.stderr)


def defer_warnings() -> None:
    """Hold warnings back: a command that is then refused prints its one error line and nothing else."""
    global _deferred
    _deferred = []


def flush_warnings(show: bool = True) -> None:
    """Print the warnings held back (``show``), or drop them (the command was refused); later ones print at once."""
    global _deferred
    pending, _deferred = _deferred or [], None
    for message in pending if show else []:
        warn(message)
