"""Preemption: SIGTERM/SIGINT become a flag the training loop polls, so it saves before exiting."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

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
