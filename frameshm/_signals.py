"""How the long-running commands (the roles, ``frameshm run``, the driver, virtualcam) take
SIGINT and SIGTERM: as a request to stop, answered with exit status 0, at any moment.

Two phases, so that no moment is left where a signal means a traceback or a kill:

* **Starting** (:func:`startup_stops`, from the start of ``frameshm.cli.main``): nothing
  exists yet that needs cleaning up, and the slow parts (imports, configuration, loading
  a detector) cannot poll a flag, so a signal raises :class:`StopRequested` right where
  the process is and the command returns 0 without starting.
* **Running** (:func:`stop_on_signals`, around the command's run): the signal only sets
  the command's stop flag; the command polls it (every blocking call is bounded) and runs
  its cleanup. The flag handler stays until the command returns, so a second signal
  during the cleanup cannot cut it short. Slow steps that only build private state
  (opening a source, loading or running a detector) run under :class:`abandon_on_stop`:
  the signal abandons them instead of waiting for them to end.

Only what runs before ``cli.main`` (the interpreter's start-up and ``import frameshm``) is
left to Python's defaults; nothing has been created by then.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from typing import Iterator, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(BaseException):
    """SIGINT/SIGTERM arrived while a long-running command was still starting, or during
    a step that :class:`abandon_on_stop` lets it abandon."""

    def __init__(self, signum: Optional[int] = None):
        super().__init__(signal.Signals(signum).name if signum else "stop requested")
        self.signum = signum


_raised_at_startup = False


def _raise_stop(signum, _frame):
    global _raised_at_startup
    _raised_at_startup = True
    raise StopRequested(signum)


def stopped_while_starting() -> bool:
    """Whether :func:`startup_stops` raised StopRequested in this process: an error that
    ends the start-up afterwards may be that exception turned into another by library
    code (an import cut short becomes ImportError), and is then a stop, not a failure."""
    return _raised_at_startup


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _swallowed_stops_quiet() -> Iterator[None]:
    """A StopRequested raised where Python cannot pass it on (a weakref or GC callback, a
    ``__del__``: the signal can land inside importlib's module-lock callback) is reported
    by the interpreter as "Exception ignored" with a traceback. The request itself is not
    lost (the start-up flag or the stop event is set before the raise), so such reports
    are dropped while the handlers are in place; every other one goes to the previous hook."""
    prev = sys.unraisablehook

    def hook(unraisable):
        if not isinstance(unraisable.exc_value, StopRequested):
            prev(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = prev


@contextlib.contextmanager
def startup_stops() -> Iterator[None]:
    """SIGINT/SIGTERM raise :class:`StopRequested` for the duration (main thread only),
    until :func:`stop_on_signals` takes over."""
    global _raised_at_startup
    if not _main_thread():
        yield
        return
    _raised_at_startup = False
    old = {s: signal.signal(s, _raise_stop) for s in STOP_SIGNALS}
    try:
        with _swallowed_stops_quiet():
            yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[threading.Event]:
    """Sets ``stop`` on SIGINT/SIGTERM for the duration (main thread only); the roles
    poll it between frames, with every blocking call bounded, so they exit promptly and
    run their cleanup.

    Inside :func:`startup_stops` the handler is left in place on exit (restoring the
    start-up one would turn a late signal into an exception after the cleanup);
    ``startup_stops`` restores the original handlers when the command returns."""
    log = logging.getLogger("frameshm.roles")

    def handler(signum, _frame):
        first = not stop.is_set()
        if first:
            log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()
        if first and _abandonable:
            raise StopRequested(signum)  # once: never again inside the cleanup that follows

    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    if _raised_at_startup:
        stop.set()  # a stop request that library code swallowed during the start-up is not lost
    try:
        with _swallowed_stops_quiet():
            yield stop
    finally:
        restore_handlers(old)


_abandonable = False  # the main thread is in a step that a stop may abandon


class abandon_on_stop:  # noqa: N801 - used like contextlib's context managers
    """Within, a stop signal (through :func:`stop_on_signals`) also raises
    :class:`StopRequested` in the main thread, abandoning the step in progress; raised at
    once if ``stop`` is already set; any other exception that ends the step once a stop
    was requested becomes StopRequested too. For slow steps that build only private state
    and cannot poll the flag: opening a source, loading or running a detector. The caller
    catches StopRequested and goes on to its cleanup. Elsewhere than in the main thread
    (where signal handlers do not run) it changes nothing. Reusable: a loop makes one and
    enters it for every frame, allocating nothing."""

    __slots__ = ("stop", "_prev")

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self._prev: Optional[bool] = None

    def __enter__(self) -> "abandon_on_stop":
        global _abandonable
        if not _main_thread():
            self._prev = None
            return self
        self._prev = _abandonable
        try:
            _abandonable = True
            if self.stop.is_set():
                raise StopRequested()
        except BaseException:  # __exit__ does not run when __enter__ raises
            _abandonable = self._prev
            raise
        return self

    def __exit__(self, exc_type, exc, _tb) -> bool:
        global _abandonable
        if self._prev is not None:
            _abandonable = self._prev
        if exc is not None and not isinstance(exc, StopRequested) and self.stop.is_set():
            # Library code may turn the StopRequested it was cut short by into an error of
            # its own (an import failing inside it becomes ImportError): after a stop
            # request, whatever ends the step is its abandonment.
            raise StopRequested() from exc
        return False


def restore_handlers(old: dict) -> None:
    """Puts back the handlers a command replaced (``{signum: handler}``), except the
    start-up one of :func:`startup_stops`: the command's own stays until it returns."""
    for s, h in old.items():
        if h is not _raise_stop:
            signal.signal(s, h)
