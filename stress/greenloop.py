"""A minimal cooperative scheduler on raw greenlets, with no gevent at all.

It stands for a greenlet-based server or job scheduler: greenlets switch to the
loop whenever they wait for a socket (psycopg2 through :func:`wait_callback`)
or sleep, and the loop resumes them when ``select`` says they are ready.
Nothing is patched, so :mod:`threading` sees one thread for all of them.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import select
import time
import typing as t

import greenlet


class Loop:
    """Round-robin greenlet loop; run it from the greenlet that created it."""

    def __init__(self) -> None:
        self.hub = greenlet.getcurrent()
        self.ready: collections.deque[tuple[greenlet.greenlet, tuple[t.Any, ...]]] = (
            collections.deque()
        )
        self.readers: dict[int, list[greenlet.greenlet]] = {}
        self.writers: dict[int, list[greenlet.greenlet]] = {}
        self.timers: list[tuple[float, int, greenlet.greenlet]] = []
        self._seq = itertools.count()

    def spawn(self, fn: t.Callable[..., t.Any], *args: t.Any) -> greenlet.greenlet:
        g = greenlet.greenlet(fn, parent=self.hub)
        self.ready.append((g, args))
        return g

    def _block(self) -> None:
        self.hub.switch()

    def wait_read(self, fd: int) -> None:
        self.readers.setdefault(fd, []).append(greenlet.getcurrent())
        self._block()

    def wait_write(self, fd: int) -> None:
        self.writers.setdefault(fd, []).append(greenlet.getcurrent())
        self._block()

    def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            self.ready.append((greenlet.getcurrent(), ()))
        else:
            heapq.heappush(
                self.timers, (time.monotonic() + seconds, next(self._seq), greenlet.getcurrent())
            )
        self._block()

    def run(self) -> None:
        """Run until no greenlet is ready, waiting or sleeping."""
        while self.ready or self.readers or self.writers or self.timers:
            while self.ready:
                g, args = self.ready.popleft()
                if not g.dead:
                    g.switch(*args)
            if not (self.readers or self.writers or self.timers):
                break
            timeout = None
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            if self.readers or self.writers:
                r, w, _ = select.select(list(self.readers), list(self.writers), [], timeout)
            else:
                time.sleep(timeout or 0.0)
                r, w = [], []
            for fd in r:
                for g in self.readers.pop(fd, []):
                    self.ready.append((g, ()))
            for fd in w:
                for g in self.writers.pop(fd, []):
                    self.ready.append((g, ()))
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                self.ready.append((heapq.heappop(self.timers)[2], ()))


def wait_callback(loop: Loop) -> t.Callable[..., None]:
    """A psycopg2 wait callback that parks the greenlet in ``loop`` while it waits."""
    import psycopg2
    import psycopg2.extensions as ext

    def wait(conn: t.Any, timeout: float | None = None) -> None:
        while True:
            state = conn.poll()
            if state == ext.POLL_OK:
                return
            if state == ext.POLL_READ:
                loop.wait_read(conn.fileno())
            elif state == ext.POLL_WRITE:
                loop.wait_write(conn.fileno())
            else:
                raise psycopg2.OperationalError(f"bad state from poll: {state}")

    return wait
