"""Preemption: SIGTERM/SIGINT become a flag the training loop polls, so it saves before exiting.

A run stopped that way exits with the shell's status for the signal, 128 + its number (SIGINT 130,
SIGTERM 143; `exit_status`), so that a scheduler or a script can tell "stopped, resumable" from
"finished" (0) and from an error (1, 2). Outside the loop (start-up, the final sample) there is
nothing to save: `sigterm_interrupts` makes SIGTERM unwind the way Ctrl-C does, so both end with
the same one line and status instead of a traceback (Ctrl-C) or a silent death (SIGTERM).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)


def exit_status(signum: int) -> int:
    """The shell's status of a process ended by signal `signum`: 128 + signum."""
    return 128 + signum


class Stopped(Exception):
    """A signal stopped the run after its state was saved; the entry point exits with `status`."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        self.status = exit_status(signum)
        super().__init__(f"{signal.Signals(signum).name} received: saved step {step}; exiting with "
                         f"status {self.status} (the same command resumes)")


class Interrupted(KeyboardInterrupt):
    """SIGTERM outside the training loop, raised like Ctrl-C's KeyboardInterrupt and handled with it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def sigterm_interrupts():
    """While active, SIGTERM raises `Interrupted`: the command unwinds (finally blocks run, a save in
    flight is committed) and its entry point reports it, instead of dying on the spot. The training
    loop's PreemptionGuard takes SIGTERM over inside it and hands it back after. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a flag the training loop polls (save, then exit cleanly).

        with PreemptionGuard() as guard:
            for step in ...:
                ...
                if guard.should_stop():
                    ckpt.save(step, state, ..., force=True); break

    A second SIGINT raises KeyboardInterrupt, so Ctrl-C twice still stops a stuck run. The
    previous handlers come back on exit. Handlers can only be installed from the main thread;
    elsewhere the guard stays inactive (and says so).
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        # Only set fields here: a handler runs between two bytecodes of arbitrary code.
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def should_stop(self) -> bool:
        """`requested` agreed across processes: a signal may reach only some hosts, and all must
        take the same branch (the save is collective). Every process must call this together."""
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.array(self.requested, np.int32))
        return bool(np.max(flags))

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            logger.warning("PreemptionGuard: not on the main thread; signals will not be caught")
            return self
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_DFL if previous is None else previous)  # None: set from C
        self._previous.clear()
