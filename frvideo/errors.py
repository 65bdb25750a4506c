"""User-facing errors: each carries a one-line message and an exit code.

The CLI prints ``frvideo: error: <message>`` and exits with ``exit_code``;
anything else escaping is a bug and keeps its traceback.
"""

# Documented exit codes (README "Exit codes").
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_OUTPUT = 4
EXIT_WEIGHTS = 5
EXIT_CONFIG = 6
EXIT_BATCH_FAILED = 7  # frvideo batch: at least one file failed (the others are done; see --status)
EXIT_INTERRUPTED = 130


class FrvideoError(Exception):
    exit_code = EXIT_INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(FrvideoError):
    exit_code = EXIT_USAGE


class InputError(FrvideoError):
    """The input file or stream is missing, unreadable or not a video."""

    exit_code = EXIT_INPUT


class OutputError(FrvideoError):
    """The output cannot be written (directory missing, not writable, bad container)."""

    exit_code = EXIT_OUTPUT


class WeightsError(FrvideoError):
    """A weight file is missing, corrupt or does not fit the architecture."""

    exit_code = EXIT_WEIGHTS


class ConfigError(FrvideoError):
    exit_code = EXIT_CONFIG
