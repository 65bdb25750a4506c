"""Signals end a run the way Ctrl-C does: stop, remove the partial output, one line,
exit 128 + the signal number (130 SIGINT, 143 SIGTERM, 129 SIGHUP, ...).

The first signal raises ``Interrupted`` in the main thread, so every ``finally``
on the way out runs (threads stopped, the temporary output file removed). A
second signal while that clean-up runs must not break it half way (a raise
inside a ``finally`` would skip the rest of it) nor leave the process hanging
(clean-up waiting on a stuck encoder or pipe): it removes the partial files
still registered, prints the line if it was not printed yet and leaves at once
with the first signal's code.

Signals that are ignored when frvideo starts (``nohup`` sets SIGHUP to ignored, a
shell's background job SIGINT) stay ignored, as Python itself does for SIGINT.
SIGKILL cannot be caught: the partial file it leaves is removed by the next run
into the same folder (see io/writer.py).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable

# The signals whose default action ends the process: each is turned into a clean stop.
STOP_SIGNALS = tuple(getattr(signal, name) for name in (
    "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGXCPU", "SIGVTALRM", "SIGPROF")
    if hasattr(signal, name))


class Interrupted(BaseException):
    """A stop signal arrived (a BaseException, like KeyboardInterrupt: no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


class _State:
    first: int | None = None  # the signal that started the stop
    reported = False  # the one "interrupted" line is out
    finished = False  # main() has returned: nothing left to clean up
    cleanups: list[Callable[[], None]] = []  # emergency clean-ups (remove partial files), never raising
    previous: dict = {}  # signal -> the handler before install()
    defer = 0  # > 0 inside deferred(): a first signal is only noted
    pending: int | None = None  # the signal noted there, raised when the block ends


def on_emergency(cleanup: Callable[[], None]) -> None:
    """Register a clean-up a second signal runs before leaving at once (it must not raise)."""
    if cleanup not in _State.cleanups:
        _State.cleanups.append(cleanup)


def report(message: str) -> None:
    """Print the one-line interruption message (once, whichever path gets there first)."""
    if not _State.reported:
        _State.reported = True
        try:
            print(message, file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass


def message(exc: Interrupted | KeyboardInterrupt) -> str:
    name = exc.name if isinstance(exc, Interrupted) else "SIGINT"
    return f"frvideo: interrupted ({name}); no output written"


def _handler(signum, frame) -> None:
    if _State.finished:  # after main() returned: the stop (if any) is done; leave with its code
        os._exit(128 + (_State.first if _State.first is not None else signum))
    if _State.first is None:
        _State.first = signum
        if _State.defer:
            _State.pending = signum
            return
        raise Interrupted(signum)
    # a second signal during the clean-up of the first: finish the essential part here, then leave
    for cleanup in list(_State.cleanups):
        try:
            cleanup()
        except BaseException:
            pass
    report(message(Interrupted(_State.first)))
    os._exit(128 + _State.first)


@contextlib.contextmanager
def deferred():
    """A block a raise must not cut through: imports of C++ extensions (a Python exception
    thrown through pybind11 module init aborts the process) and the like. A first signal in
    it is raised when the block ends; a second one still leaves at once."""
    _State.defer += 1
    try:
        yield
    finally:
        _State.defer -= 1
    if not _State.defer and _State.pending is not None:
        signum, _State.pending = _State.pending, None
        raise Interrupted(signum)


def install() -> None:
    """Handle the stop signals (main thread only; elsewhere, e.g. inside a test runner thread, a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _State.first, _State.reported, _State.finished = None, False, False
    _State.defer, _State.pending = 0, None
    for sig in STOP_SIGNALS:
        try:
            before = signal.getsignal(sig)
            if before == signal.SIG_IGN or before is _handler:
                continue  # nohup, background jobs: the caller asked for this signal to be ignored
            _State.previous[sig] = before
            signal.signal(sig, _handler)
        except (OSError, ValueError):
            pass
    # exceeding a file-size limit (ulimit -f) kills by default; ignored, the write fails with EFBIG
    # and ends as an output error with the partial file removed
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def uninstall() -> None:
    """Back to the defaults (tests run main() in-process several times)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _State.finished = True
    if _State.first is not None:
        # stopped by a signal, clean-up done: Python's exit resets its handlers to the defaults, so a
        # later signal (to any thread) would kill the process and change the exit code; ignore them
        for sig in STOP_SIGNALS:
            try:
                signal.signal(sig, signal.SIG_IGN)
            except (OSError, ValueError):
                pass
        return
    for sig, before in list(_State.previous.items()):
        try:
            if signal.getsignal(sig) is _handler:
                signal.signal(sig, before if before is not None else signal.SIG_DFL)
        except (OSError, ValueError, TypeError):
            pass
    _State.previous.clear()


def call_beside(fn: Callable, name: str):
    """``fn()`` in a helper thread while the main thread waits beside it: a call that blocks
    inside C code (FFmpeg waiting for a server's client or a slow host) cannot be interrupted,
    but the waiting main thread still receives Ctrl-C or SIGTERM and stops the run at once.
    Returns fn's result or raises its exception."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the main thread
            result["error"] = exc

    helper = threading.Thread(target=run, daemon=True, name=name)
    helper.start()
    while helper.is_alive():
        helper.join(0.1)
    if "error" in result:
        raise result["error"]
    return result["value"]
