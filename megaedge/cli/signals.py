"""SIGTERM and SIGHUP handled like Ctrl-C.

systemd, ``docker stop`` and a closed terminal stop a process with SIGTERM / SIGHUP, whose default action kills it on
the spot: no ``finally`` block runs, so an export leaves its staging folder and a stream loses its last words.
Inside :func:`stop_like_ctrl_c` they raise :class:`Terminated`, a KeyboardInterrupt, so every cleanup path written
for Ctrl-C runs for them too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


_IMPORT_RETRY_S = 0.05


def _importing(frame) -> bool:
    """Whether the interrupted code runs inside an import (the import machinery is on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM or SIGHUP arrives."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name

    @property
    def exit_status(self) -> int:
        """The shell's status for a process stopped by this signal (143 for SIGTERM)."""
        return 128 + self.signum


class _Guard:
    def __init__(self):
        self.received: int | None = None  # the first signal; later ones are ignored
        self.holding = False
        self.deferring = False
        self._raised = False
        self._waiting_for_import = False

    def handler(self, signum, frame):
        if self.received is not None and not self._waiting_for_import:
            # Cleanup (or the final flush) is already running because of the first one: let it finish. A supervisor
            # that will not wait sends SIGKILL anyway.
            return
        if self.received is None:
            self.received = signum
        self._waiting_for_import = False
        if self.holding or self.deferring:
            return
        if _importing(frame):
            # An exception raised while a module is being imported can escape through a C extension's init function,
            # which some binding libraries (nanobind, pybind11) turn into std::terminate: the process aborts and no
            # cleanup runs. Imports are short, so ask again a moment later, once the import is over.
            self._waiting_for_import = True
            timer = threading.Timer(_IMPORT_RETRY_S, os.kill, (os.getpid(), self.received))
            timer.daemon = True
            timer.start()
            return
        self._raise()

    def _raise(self):
        self._raised = True
        raise Terminated(self.received)

    def hold(self) -> None:
        """From now on signals are only recorded: the caller is wrapping up and must not be cut short."""
        self.holding = True

    @contextlib.contextmanager
    def deferred(self):
        """A signal inside the block is raised when the block ends, not in the middle of it (of a stream's state
        update, say), so the work after the interruption starts from a consistent state."""
        outer, self.deferring = self.deferring, True
        try:
            yield
        finally:
            self.deferring = outer
        if not outer and self.received is not None and not (self._raised or self.holding):
            self._raise()


@contextlib.contextmanager
def stop_like_ctrl_c():
    """Within the block, the first SIGTERM/SIGHUP raises :class:`Terminated`; later ones are ignored.

    The previous handlers come back on exit. Outside the main thread (signals cannot be handled there) it does
    nothing."""
    guard = _Guard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    previous = {sig: signal.signal(sig, guard.handler) for sig in _SIGNALS}
    try:
        yield guard
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)  # None: set outside Python
