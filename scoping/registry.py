"""The registry: one Session per live scope, in a plain dict.

:class:`Registry` keeps SQLAlchemy's registry contract (``__call__``, ``has``,
``set``, ``clear``; it *is* a :class:`sqlalchemy.util.ScopedRegistry`) and
adds what a long-running process needs: ``len(registry)`` counts live scopes,
:meth:`Registry.close_all` closes every Session, and scopes that end without
``remove()`` are cleaned up on their own.

How cleanup stays safe
----------------------
Closing a Session is database I/O (a ROLLBACK), which must never run inside a
garbage-collector or weakref callback, nor in a gevent hub callback. So the
end of a scope is handled in two steps:

1. *Retire* (any context, no I/O): the strategy reports the end (gevent
   ``rawlink``, asyncio done-callback, weakref callback, or a poll of
   ``greenlet.dead``); the entry leaves the dict at once and its Session goes
   on a queue.
2. *Close* (an ordinary greenlet or thread): the queue is drained by the next
   Session the registry creates, by :meth:`Registry.collect`, and under gevent
   by a short-lived cleanup greenlet spawned as soon as a scope retires, so
   pooled connections come back even when no one else touches the registry.

Scopes that cannot signal their end (raw greenlets, OS threads) are polled
when new Sessions are created, at a cost that stays constant per creation.
"""

from __future__ import annotations

import collections
import logging
import sys
import typing as t

from sqlalchemy.util import ScopedRegistry

from .errors import NoScopeToken
from .scopes import ScopeStrategy, check_hashable

__all__ = ["Registry"]

_T = t.TypeVar("_T", bound=t.Any)

log = logging.getLogger("scoping")
_modules = sys.modules  # still reachable from callbacks during interpreter shutdown

_MIN_SWEEP = 64


class Registry(ScopedRegistry[_T]):
    """One object (a Session) per live scope of ``strategy``, in a dict.

    ``registry.registry`` is the dict, keyed by ``strategy.current()``. Its
    size is the number of live scopes holding a Session. Lookups cost one
    ``strategy.current()`` call and one dict lookup.
    """

    __slots__ = (
        "_cleanup_pending",
        "_created",
        "_retired",
        "_sweep_at",
        "_watched",
        "strategy",
    )

    registry: dict[t.Hashable, _T]

    def __init__(self, createfunc: t.Callable[[], _T], strategy: ScopeStrategy) -> None:
        super().__init__(createfunc, strategy.current)
        self.strategy = strategy
        # key -> True when its end is signalled, False when it must be polled
        self._watched: dict[t.Hashable, bool] = {}
        self._retired: collections.deque[_T] = collections.deque()
        self._created = 0
        self._sweep_at = _MIN_SWEEP
        self._cleanup_pending = False

    # -- SQLAlchemy's registry contract -------------------------------------

    def __call__(self) -> _T:
        """Return the current scope's object, creating it if needed."""
        key = self.scopefunc()
        try:
            return self.registry[key]
        except KeyError:
            return self._create(key)
        except TypeError:
            check_hashable(key, self.strategy)
            raise

    def has(self) -> bool:
        """Return True if an object is present in the current scope."""
        try:
            key = self.scopefunc()
        except NoScopeToken:
            return False  # no scope is current, so nothing is present in it
        check_hashable(key, self.strategy)
        return key in self.registry

    def set(self, obj: _T) -> None:
        """Set the value for the current scope."""
        key = self.scopefunc()
        check_hashable(key, self.strategy)
        self.registry[key] = obj
        self._watch(key)

    def clear(self) -> None:
        """Clear the current scope, if any (the object is not closed)."""
        self.pop_current()

    # -- additions -----------------------------------------------------------

    def __len__(self) -> int:
        """Number of live scopes that hold an object."""
        return len(self.registry)

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} strategy={self.strategy.name!r} live={len(self.registry)} "
            f"retired={len(self._retired)}>"
        )

    def pop_current(self) -> _T | None:
        """Take the current scope's object out of the registry and return it."""
        try:
            key = self.scopefunc()
        except NoScopeToken:
            return None
        try:
            return self.discard(key)
        except TypeError:
            check_hashable(key, self.strategy)
            raise

    def discard(self, key: t.Hashable) -> _T | None:
        """Take the object of scope ``key`` out of the registry and return it."""
        if self._watched.get(key) is False:
            # A polled scope is watched again if it makes a new object; a
            # signalled one stays watched, so its callback is not added twice.
            self._watched.pop(key, None)
        return self.registry.pop(key, None)

    def collect(self) -> int:
        """Retire ended scopes now and close their Sessions; return how many.

        Runs database I/O: call it from ordinary code, never from a callback.
        """
        self._sweep()
        return self._close_retired()

    def close_all(self) -> int:
        """Close every Session of every scope and empty the registry.

        For process shutdown and tests. Every Session is closed even when some
        ``close()`` fails; the first failure is raised at the end. Returns the
        number of Sessions closed.
        """
        sessions = list(self.registry.values())
        self.registry.clear()
        self._watched.clear()
        self._retired.extend(sessions)
        return self._close_retired(raise_errors=True)

    # -- cleanup machinery -----------------------------------------------------

    def _create(self, key: t.Hashable) -> _T:
        self._created += 1
        if self._created >= self._sweep_at:
            self._sweep()
        if self._retired:
            self._close_retired()
        obj = self.createfunc()
        current = self.registry.setdefault(key, obj)
        self._watch(key)
        return current

    def _watch(self, key: t.Hashable) -> None:
        if key not in self._watched:
            self._watched[key] = True  # claim first: watch() may signal at once
            self._watched[key] = bool(self.strategy.watch(key, self._scope_ended))

    def _scope_ended(self, key: t.Hashable) -> None:
        # Retire: runs in callbacks of every kind, so no I/O and no locks.
        self._watched.pop(key, None)
        obj = self.registry.pop(key, None)
        if obj is None:
            return
        self._retired.append(obj)
        self._schedule_cleanup()

    def _sweep(self) -> None:
        self._created = 0
        is_ended = self.strategy.is_ended
        polled = [key for key, signalled in list(self._watched.items()) if not signalled]
        for key in polled:
            if is_ended(key):
                self._scope_ended(key)
        # Sweep again after as many creations as there are polled scopes left,
        # so the cost per creation stays constant.
        self._sweep_at = max(_MIN_SWEEP, len(polled))

    def _close_retired(self, raise_errors: bool = False) -> int:
        closed = 0
        first_error: Exception | None = None
        retired = self._retired
        while True:
            try:
                obj = retired.popleft()
            except IndexError:
                break
            try:
                obj.close()
            except Exception as exc:
                if raise_errors and first_error is None:
                    first_error = exc
                log.warning("closing the Session of an ended scope failed", exc_info=True)
            closed += 1
        if first_error is not None:
            raise first_error
        return closed

    def _schedule_cleanup(self) -> None:
        """Under gevent, drain the queue from a fresh greenlet, not the hub."""
        if self._cleanup_pending:
            return
        modules = _modules
        if modules is None:  # interpreter shutdown  # type: ignore[comparison-overlap]
            return
        gevent = modules.get("gevent")
        if gevent is None:
            return
        hub_cls = getattr(modules.get("gevent.hub"), "Hub", None)
        from greenlet import getcurrent

        if hub_cls is None or not isinstance(getcurrent(), hub_cls):
            return  # not in a hub callback: the next use of the registry drains
        self._cleanup_pending = True
        gevent.spawn(self._cleanup)

    def _cleanup(self) -> None:
        self._cleanup_pending = False
        self._close_retired()
