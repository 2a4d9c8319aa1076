"""Cooperative psycopg2 under gevent that cancels the server statement on interruption.

psycopg2 talks to the server through libpq, which gevent cannot monkey-patch:
without a *wait callback* every query blocks the whole hub, so no other
greenlet runs and ``gevent.Timeout`` cannot fire. :func:`patch_psycopg2`
installs a callback that waits with ``gevent.socket.wait_read/wait_write``,
like psycogreen's ``gevent_wait_callback``. Unit of effect: the process
(psycopg2 has one global wait callback), so call it once, after
``gevent.monkey.patch_all()``, e.g. in gunicorn's ``post_fork`` hook::

    from gevent import monkey; monkey.patch_all()
    import scoping.green
    scoping.green.patch_psycopg2()

What it does differently from psycogreen: when the waiting greenlet is
interrupted (``gevent.Timeout``, ``Greenlet.kill()``, ``KeyboardInterrupt``,
any exception raised into the wait), psycogreen lets psycopg2 drop the
connection while **the server keeps running the statement** until it ends by
itself. This callback first calls ``conn.cancel()`` and keeps polling until
the server has answered (with ``QueryCanceled``), re-sending the cancel once a
second in case it reached the server before the statement started; then it
re-raises the original interruption unchanged, so the caller sees its own
``Timeout`` or ``GreenletExit``. The drain is bounded by ``drain_timeout``
seconds (default 5): past that the server is presumed dead and the
interruption is re-raised at once. A second interruption that arrives during
the drain ends the drain and propagates instead of the first one (so an outer
``Timeout`` still reaches its own ``with`` block).

Resulting state, measured with psycopg2 2.9.13, SQLAlchemy 2.1.9 and
PostgreSQL 15 (``tests/test_green.py``):

- the statement is over on the server when the caller sees the interruption
  (nothing left in ``pg_stat_activity``); with psycogreen it is still active;
- the psycopg2 connection is **closed** (``conn.closed == 2``) either way:
  psycopg2 closes any connection whose wait callback raised (``green_panic``
  in its ``green.c``), even after a complete drain. Only a callback that
  swallows the interruption could keep it open, and that would hide the
  ``Timeout`` from its caller;
- SQLAlchemy treats the ``BaseException`` as a disconnect of that one
  connection: the ``Connection`` is invalidated, ``Session.remove()`` returns
  it to the pool, ``engine.pool.checkedout() == 0`` afterwards, the rest of
  the pool is untouched and the next request opens a fresh connection.

Costs: the normal path is the same poll loop as psycogreen. On interruption
the caller gets its exception a few milliseconds later (3 ms median against
a local server, ``tests/green_scripts/bench_callbacks.py``): ``conn.cancel()``
is libpq's ``PQcancel``, a blocking connect and round trip made while holding
the GIL, then the drain waits cooperatively for the answer. Against a server
that silently drops packets ``PQcancel`` blocks the whole process until the
kernel's TCP connect timeout; ``drain_timeout`` does not bound that part.

psycopg 3 (3.1.14 or later) needs no callback: it picks a gevent-friendly
wait function when ``psycopg`` is imported after ``patch_all()``. On a
``gevent.Timeout`` or ``GreenletExit`` it does not cancel either (it only
cancels on ``KeyboardInterrupt``/``SystemExit``); see the README, "psycopg 3".

Nothing here imports gevent or psycopg2 at import time.
"""

from __future__ import annotations

import time
import typing as t

__all__ = [
    "GeventWaitCallback",
    "is_psycopg2_patched",
    "is_waiting",
    "patch_psycopg2",
    "psycopg2_wait_callback",
    "unpatch_psycopg2",
]

#: Default bound, in seconds, on waiting for the server to answer a cancel.
DEFAULT_DRAIN_TIMEOUT = 5.0
#: How long to wait for the answer to one cancel before sending another one.
_CANCEL_RETRY_INTERVAL = 1.0
# psycopg2.extensions.POLL_OK/READ/WRITE (stable since psycopg2 2.2); spelled
# out so that this module needs no psycopg2 import. Checked by the tests.
_POLL_OK, _POLL_READ, _POLL_WRITE = 0, 1, 2
# ids of the psycopg2 connections a greenlet is waiting on right now (their
# native mutex is held: touching them would block the OS thread).
_waiting: set[int] = set()


def is_waiting(conn: object) -> bool:
    """Is a greenlet inside a statement on psycopg2 connection ``conn`` right now?

    Only known for waits made by scoping's callback. ``Registry.close_all()``
    uses it to skip such Sessions instead of blocking the hub.
    """
    return id(conn) in _waiting


def _check_drain_timeout(drain_timeout: object) -> float:
    if isinstance(drain_timeout, bool) or not isinstance(drain_timeout, (int, float)):
        raise TypeError(
            f"drain_timeout must be a number of seconds, got {drain_timeout!r}: pass e.g. "
            f"drain_timeout=5.0"
        )
    value = float(drain_timeout)
    if not (0 <= value < float("inf")):  # also refuses nan
        raise ValueError(
            f"drain_timeout must be a finite number of seconds >= 0, got {drain_timeout!r}: "
            f"an unbounded drain could hold an interrupted greenlet for good"
        )
    return value


class GeventWaitCallback:
    """A psycopg2 wait callback that yields to the gevent hub and cancels on interruption.

    Instances are what :func:`patch_psycopg2` installs; call
    :func:`psycopg2_wait_callback` to get the active one. psycopg2 calls it as
    ``callback(conn)`` from the greenlet running the query.
    """

    __slots__ = ("_wait_read", "_wait_write", "drain_timeout")

    def __init__(self, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT) -> None:
        drain_timeout = _check_drain_timeout(drain_timeout)
        # Imported when the callback is built (by patch_psycopg2), never at
        # module import; bound here to keep imports off the per-query path.
        from gevent.socket import wait_read, wait_write

        self.drain_timeout = drain_timeout
        self._wait_read = wait_read
        self._wait_write = wait_write

    def __repr__(self) -> str:
        return f"<scoping.green.GeventWaitCallback drain_timeout={self.drain_timeout}>"

    def __call__(self, conn: t.Any, timeout: float | None = None) -> None:
        key = id(conn)
        _waiting.add(key)
        try:
            self._wait(conn, timeout)
        finally:
            _waiting.discard(key)

    def _wait(self, conn: t.Any, timeout: float | None) -> None:
        while True:
            state = conn.poll()
            if state == _POLL_OK:
                return
            if state == _POLL_READ:
                wait = self._wait_read
            elif state == _POLL_WRITE:
                wait = self._wait_write
            else:
                from psycopg2 import OperationalError

                raise OperationalError(f"Bad result from poll: {state!r}")
            try:
                wait(conn.fileno(), timeout=timeout)
            except BaseException:
                # Interrupted while the server works for us: stop the
                # statement before letting psycopg2 close the connection.
                self._cancel_and_drain(conn)
                raise

    def _cancel_and_drain(self, conn: t.Any) -> None:
        """Cancel the running statement and poll until the server has answered.

        Returns when the connection is back to ``POLL_OK``, when it cannot be
        cancelled (still connecting, already broken) or after
        ``drain_timeout`` seconds. A ``BaseException`` raised into the drain
        (another interruption) propagates.
        """
        wait_read, wait_write = self._wait_read, self._wait_write
        deadline = time.monotonic() + self.drain_timeout
        next_cancel = 0.0
        while True:
            now = time.monotonic()
            try:
                if now >= next_cancel:
                    # A cancel that reaches the backend before it starts the
                    # statement is ignored by PostgreSQL: repeat it now and then.
                    conn.cancel()
                    next_cancel = now + _CANCEL_RETRY_INTERVAL
                state = conn.poll()
            except Exception:
                # cancel() refused (connection still being built, or closed)
                # or poll() failed: nothing to drain, psycopg2 closes it.
                return
            if state == _POLL_OK or now >= deadline:
                return
            wait = min(deadline, next_cancel) - now
            try:
                if state == _POLL_READ:
                    wait_read(conn.fileno(), timeout=wait, timeout_exc=_DrainTick)
                elif state == _POLL_WRITE:
                    wait_write(conn.fileno(), timeout=wait, timeout_exc=_DrainTick)
                else:
                    return
            except _DrainTick:
                pass


class _DrainTick(Exception):
    """Internal: a bounded wait inside the drain expired."""


def _extensions() -> t.Any:
    try:
        from psycopg2 import extensions
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "scoping.green needs psycopg2: pip install psycopg2-binary (or psycopg2)"
        ) from exc
    return extensions


def patch_psycopg2(*, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT) -> GeventWaitCallback:
    """Make psycopg2 cooperative under gevent and cancel statements on interruption.

    :param drain_timeout: seconds (finite, >= 0) to wait for the server to
      answer the cancel of an interrupted statement; refused up front when
      not a number, negative, infinite or nan.

    Unit of effect: the whole process (psycopg2 has a single wait callback).
    Fork: the callback is inherited by children, which is what they need.
    Idempotent: when a :class:`GeventWaitCallback` with the same
    ``drain_timeout`` is already active it is kept. Replaces any other
    callback (psycogreen's included). Returns the active callback.
    Raises :class:`ImportError` naming the package to install when gevent or
    psycopg2 is missing.
    """
    drain_timeout = _check_drain_timeout(drain_timeout)
    extensions = _extensions()
    try:
        import gevent.socket  # noqa: F401  (fail now, not in the first query)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("scoping.green needs gevent: pip install gevent") from exc
    current = extensions.get_wait_callback()
    if isinstance(current, GeventWaitCallback) and current.drain_timeout == drain_timeout:
        return current
    callback = GeventWaitCallback(drain_timeout)
    extensions.set_wait_callback(callback)
    return callback


def unpatch_psycopg2() -> None:
    """Remove psycopg2's wait callback (whichever is installed): queries block again."""
    _extensions().set_wait_callback(None)


def psycopg2_wait_callback() -> t.Callable[..., t.Any] | None:
    """Return psycopg2's active wait callback (ours, psycogreen's, ...) or ``None``."""
    callback: t.Callable[..., t.Any] | None = _extensions().get_wait_callback()
    return callback


def is_psycopg2_patched() -> bool:
    """Return True when the active psycopg2 wait callback is scoping's.

    ``False`` when no callback is installed *or* another one is (for example
    psycogreen's); use :func:`psycopg2_wait_callback` to tell those apart.
    """
    return isinstance(psycopg2_wait_callback(), GeventWaitCallback)
