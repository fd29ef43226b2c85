"""Stopping a command on Ctrl-C, SIGTERM or SIGHUP as the user asked: what it started is stopped, its runs
end KILLED, and the process exits 128 + the signal (130 for Ctrl-C).

SIGTERM is what systemd, docker and a cluster scheduler send; SIGHUP what a closed terminal sends. Both
are made to behave like Ctrl-C: within :func:`interruptible` each of the three raises :class:`Interrupted`
(a ``KeyboardInterrupt``) in the main thread, so every ``finally`` and ``except KeyboardInterrupt`` that
closes a run or stops a server runs. :func:`graceful` is for a body that knows how to stop cleanly (Tune
checkpoints its experiment and stops its trials): the first signal asks it to, a second one raises.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP, raised where the command was."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# The last stop signal a handler here received: Ray's blocking calls (ray.get, ray.wait) turn an exception
# raised by a signal handler into a plain KeyboardInterrupt, which loses the signal.
_last_signal: list[int] = []


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal that stopped the command: the exception's own, else the last one received here,
    else Ctrl-C's (130)."""
    if isinstance(exc, Interrupted):
        return exc.exit_code
    return 128 + (_last_signal[-1] if _last_signal else signal.SIGINT)


def _record(signum: int) -> None:
    _last_signal[:] = [int(signum)]


def _raise(signum, frame):
    _record(signum)
    raise Interrupted(signum)


@contextlib.contextmanager
def _handlers(handler, signals) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    _last_signal.clear()
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def interruptible(signals=STOP_SIGNALS) -> Iterator[None]:
    """Within the body each of ``signals`` raises :class:`Interrupted`; the previous handlers come back after."""
    with _handlers(_raise, signals):
        yield


@dataclass
class Received:
    signum: int | None = None


@contextlib.contextmanager
def graceful(stop: Callable[[int], None], signals=STOP_SIGNALS) -> Iterator[Received]:
    """Within the body the first of ``signals`` is recorded and calls ``stop(signum)``, which should make the
    body return soon (or raise); a second raises :class:`Interrupted`. Yields the record: ``.signum`` is set
    if one came."""
    received = Received()

    def handler(signum, frame):
        if received.signum is not None:
            _raise(signum, frame)
        received.signum = int(signum)
        _record(signum)
        stop(signum)

    with _handlers(handler, signals):
        yield received
