"""What a process made by ``os.fork()`` does with what it inherited.

Unit of effect: the process. ``multiprocessing`` (the "fork" start method),
gunicorn ``--preload``, Celery's prefork pool and a bare ``os.fork()`` all go
through the one hook registered here with
``os.register_at_fork(after_in_child=...)``, once, when this module is
imported (``import scoping`` does): a child then knows when it was forked
(:func:`forked_at`) even if no registry was built before the fork, which is
what the doctor's check for inherited pooled connections needs.

In the child, the inherited Sessions and pooled connections are *the
parent's*: their sockets are the parent's sockets. Anything sent on them (a
ROLLBACK from ``Session.close()``, a driver's goodbye when a connection is
closed) reaches the parent's server backend, and the parent's transaction
silently loses its work or its connection. (Merely freeing an inherited
psycopg2 2.9 connection sends nothing: libpq remembers the pid that opened
it, measured in ``tests/test_fork.py``; other drivers make no such promise.)
So, in the child:

- every registry forgets every Session it inherited (live or queued for
  closing) without closing, rolling back or freeing it: they are kept,
  untouched, in :data:`quarantine` for the life of the child;
- every :class:`scoping.scoped_session` replaces the pools of the engines its
  session factory binds (``bind=`` and ``binds=``) with
  :func:`dispose_engines`: new connections are opened on first use, and the
  inherited ones are quarantined too, never closed.

Costs: nothing in the parent; in the child, one new pool per engine and the
inherited objects' memory. The child never sends anything on an inherited
connection, so the parent's transactions and connections are unaffected.

Example (``multiprocessing`` with the fork start method)::

    import multiprocessing
    import scoping
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import sessionmaker

    engine = create_engine("sqlite://")
    Session = scoping.scoped_session(sessionmaker(bind=engine))

    def work():
        Session.execute(text("select 1"))   # a fresh Session and connection
        Session.remove()

    if __name__ == "__main__":
        Session.execute(text("select 1"))   # the parent's own Session
        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(target=work)
        child.start()
        child.join()
"""

from __future__ import annotations

import os
import time
import typing as t
import weakref

if t.TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = ["dispose_engines", "forked_at", "quarantine"]

#: Objects inherited across a fork that must never be touched nor freed in this
#: process (Sessions, old pools): they hold the parent's connections.
quarantine: list[object] = []

_forked_at: float | None = None
_owners: weakref.WeakSet[t.Any] = weakref.WeakSet()  # scoped_sessions
_hooked = False


def forked_at() -> float | None:
    """``time.time()`` when this process was forked, or ``None``.

    ``None`` when the process has not been forked since scoping was
    imported. Updated in every child, grandchildren included.
    """
    return _forked_at


def dispose_engines(*engines: Engine) -> None:
    """Give each engine a new, empty pool, without touching its old connections.

    :param engines: SQLAlchemy :class:`~sqlalchemy.engine.Engine` objects.

    This is ``engine.dispose(close=False)`` (SQLAlchemy's advice for a forked
    child), plus one thing it does not do: the old pool, and with it every
    idle pooled connection, is kept in :data:`quarantine`, so nothing in the
    child ever closes or frees the parent's connections, whatever a driver
    does when a connection is freed (psycopg2 2.9 sends nothing then; other
    drivers may say goodbye on the parent's socket). Call it in a child
    before using an engine that the parent had connected;
    :class:`scoping.scoped_session` does it by itself, in every forked child,
    for the engines its session factory binds (see
    :meth:`scoping.scoped_session.dispose_engines`). In the parent it is
    harmless but pointless: use ``engine.dispose()`` there. No I/O.
    """
    for engine in engines:
        quarantine.append(engine.pool)
        engine.dispose(close=False)


def _track_owner(owner: object) -> None:
    _hook()
    _owners.add(owner)


def _hook() -> None:
    global _hooked
    if not _hooked:
        _hooked = True
        os.register_at_fork(after_in_child=_after_in_child)


def _after_in_child() -> None:
    # Runs in the child right after fork, after CPython dropped the other
    # threads (whose exit callbacks may have retired Sessions into queues).
    # No I/O here, and no exception may escape.
    global _forked_at
    _forked_at = time.time()
    try:
        from . import registry as _registry

        _registry._reaper_after_fork()
        for signal in list(_registry._reaper_signals):
            reg = signal.registry
            if reg is not None:
                quarantine.extend(reg._forget_inherited())
        seen: set[int] = set()
        for owner in list(_owners):
            for engine in owner._bound_engines():
                if id(engine) not in seen:
                    seen.add(id(engine))
                    dispose_engines(engine)
    except Exception as exc:  # pragma: no cover - nothing above raises
        import sys

        from ._units import _Unraisable

        sys.unraisablehook(t.cast(t.Any, _Unraisable(exc, None, "after-fork hook")))


# At import, not at the first registry: a process that imported scoping and
# forked before building one (a plain sessionmaker app under gunicorn
# --preload) must still know its fork time, exactly; /proc's start time has a
# 10 ms tick, and a pooled connection the parent opened within that tick of
# the fork would pass for the child's own (scoping.doctor).
_hook()
