"""Stream slots: at most ``slots`` decoding at once (realtime sessions and transcription requests together), at
most ``queue`` transcription requests waiting for a slot; beyond that a request is refused at once (HTTP 429, or an
``error`` event and close code 1013 on a realtime connection). Used from the event loop only (no locks needed)."""

from __future__ import annotations

import asyncio
from collections import deque


class Busy(Exception):
    """No slot free and no room in the queue."""


class Admission:
    def __init__(self, slots: int, queue: int):
        if slots < 1 or queue < 0:
            raise ValueError(f"slots {slots} must be >= 1 and queue {queue} >= 0")
        self.slots, self.queue = slots, queue
        self.free = slots
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def active(self) -> int:
        return self.slots - self.free

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def try_acquire(self) -> bool:
        """A slot now, or False (realtime sessions do not queue: a live stream cannot wait)."""
        if self.free > 0 and not self.queued:
            self.free -= 1
            return True
        return False

    async def acquire(self) -> None:
        """A slot, waiting in FIFO order behind at most ``queue - 1`` others; Busy when the queue is full."""
        if self.try_acquire():
            return
        if self.queued >= self.queue:
            raise Busy()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as the request was dropped: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the first waiter
                return
        self.free += 1
