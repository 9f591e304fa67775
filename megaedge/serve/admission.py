"""Stream slots: at most ``slots`` decoding at once (realtime sessions and transcription requests together), at
most ``queue`` transcription requests waiting for a slot; beyond that a request is refused at once (HTTP 429).
A realtime connection may wait a moment for a slot (``wait``), never longer: a live stream cannot queue, but a
client that closes and reconnects at once races the release of its own old slot, and refusing it would be wrong.
A freed slot goes to a waiting realtime connection before any queued request: a microphone cannot wait, an upload
can (in FIFO order among the uploads), so steady uploads never lock the live streams out.
Used from the event loop only (no locks needed)."""

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
        self._waiters: deque[asyncio.Future] = deque()  # FIFO, transcription requests and realtime connections
        self._brief: set[asyncio.Future] = set()  # the realtime ones among them (not counted as queued requests)

    @property
    def active(self) -> int:
        return self.slots - self.free

    @property
    def queued(self) -> int:
        """Transcription requests waiting for a slot."""
        return sum(1 for w in self._waiters if not w.done() and w not in self._brief)

    def _waiting(self) -> bool:
        return any(not w.done() for w in self._waiters)

    def try_acquire(self) -> bool:
        """A slot now, or False (someone waiting comes first)."""
        if self.free > 0 and not self._waiting():
            self.free -= 1
            return True
        return False

    async def acquire(self) -> None:
        """A slot, waiting in FIFO order behind at most ``queue - 1`` others; Busy when the queue is full."""
        if self.try_acquire():
            return
        if self.queued >= self.queue:
            raise Busy()
        await self._wait(asyncio.get_running_loop().create_future())

    async def wait(self, seconds: float) -> bool:
        """A slot now or within ``seconds`` (FIFO with the queued requests); False when none came in time."""
        if self.try_acquire():
            return True
        if seconds <= 0:
            return False
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._brief.add(waiter)
        timer = loop.call_later(seconds, lambda: waiter.done() or waiter.set_result(False))
        try:
            return await self._wait(waiter)
        finally:
            timer.cancel()
            self._brief.discard(waiter)

    async def _wait(self, waiter: asyncio.Future) -> bool:
        self._waiters.append(waiter)
        try:
            return await waiter  # True: release() handed this waiter its slot; False: the time ran out
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release()  # the slot was handed over just as the waiter was dropped: pass it on
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self) -> None:
        live = next((w for w in self._waiters if w in self._brief and not w.done()), None)
        if live is not None:  # a waiting realtime connection first
            self._waiters.remove(live)
            live.set_result(True)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)  # the slot goes straight to the first waiter
                return
        self.free += 1
