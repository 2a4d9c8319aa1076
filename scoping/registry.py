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
   Session the registry creates, by :meth:`Registry.collect`, under gevent
   by a short-lived cleanup greenlet spawned as soon as a scope retires, and
   otherwise by one daemon *reaper* thread per process, started by the first
   registry that creates a Session, which wakes as soon as a scope retires.
   So pooled connections (and the row locks of an ended thread's open
   transaction) come back even when no one else touches the registry.

Scopes that cannot signal their end (raw greenlets) are polled when new
Sessions are created, at a cost that stays constant per creation, and by the
reaper once a second while any are live. A suspended raw greenlet that no one
but the registry references any more can never run again: polling lets it go,
so it is collected and its ``finally`` blocks run.

The callbacks given to strategies hold the registry weakly: a registry (and
the engine its Sessions use) that the application drops is garbage collected
even while threads it served live on. In a child made by ``os.fork()`` every
registry forgets what it inherited without touching it (:mod:`scoping.fork`).
"""

from __future__ import annotations

import collections
import logging
import sys
import typing as t
import weakref

from sqlalchemy.util import ScopedRegistry

from . import _units
from .errors import NoScopeToken, ScopingError
from .scopes import ScopeStrategy, check_hashable

__all__ = ["Registry"]

_T = t.TypeVar("_T", bound=t.Any)

log = logging.getLogger("scoping")
_modules = sys.modules  # still reachable from callbacks during interpreter shutdown

_MIN_SWEEP = 64
#: Seconds between two polls of unsignalled scopes (raw greenlets) by the reaper.
POLL_INTERVAL = 1.0


class _EndSignal:
    """What strategies call when a scope ended; holds its registry weakly.

    The registry holds it (and it the registry, through a weak reference to
    itself kept alive by the registry): callbacks left behind in a long-lived
    thread's exit list keep neither the registry nor its engine alive.
    """

    __slots__ = ("__weakref__", "registry")

    def __init__(self, registry: Registry[t.Any]) -> None:
        self.registry: Registry[t.Any] | None = registry

    def __call__(self, key: t.Hashable) -> None:
        registry = self.registry
        if registry is not None:
            registry._scope_ended(key)

    def poll(self, key: t.Hashable) -> None:
        registry = self.registry
        if registry is not None:
            registry._poll_later(key)


class _WeakEnd:
    """The callable actually handed to strategies: a weak reference to the signal."""

    __slots__ = ("ref",)

    def __init__(self, signal: _EndSignal) -> None:
        self.ref = weakref.ref(signal)

    def __call__(self, key: t.Hashable) -> None:
        signal = self.ref()
        if signal is not None:
            signal(key)

    def poll(self, key: t.Hashable) -> None:
        signal = self.ref()
        if signal is not None:
            signal.poll(key)


class Registry(ScopedRegistry[_T]):
    """One object (a Session) per live scope of ``strategy``, in a dict.

    ``registry.registry`` is the dict, keyed by ``strategy.current()``. Its
    size is the number of live scopes holding a Session. Lookups cost one
    ``strategy.current()`` call and one dict lookup.

    :param createfunc: makes the object of a new scope (the session factory).
    :param strategy: the :class:`~scoping.ScopeStrategy` whose keys are used.
    """

    __slots__ = (
        "_cleanup_pending",
        "_created",
        "_endless_types",
        "_on_end",
        "_polling",
        "_retired",
        "_signal",
        "_strategy_watch",
        "_sweep_at",
        "_watched",
        "strategy",
    )

    registry: dict[t.Hashable, _T]

    def __init__(self, createfunc: t.Callable[[], _T], strategy: ScopeStrategy) -> None:
        if not callable(createfunc):
            raise TypeError(
                f"the session factory {createfunc!r} is not callable: pass a "
                f"sqlalchemy.orm.sessionmaker(bind=engine)"
            )
        super().__init__(createfunc, strategy.current)
        self.strategy = strategy
        # key -> True when its end is signalled, False when it must be polled
        self._watched: dict[t.Hashable, bool] = {}
        self._retired: collections.deque[_T] = collections.deque()
        self._created = 0
        self._sweep_at = _MIN_SWEEP
        self._cleanup_pending = False
        self._polling = False  # a poller (reaper or gevent greenlet) knows of our polled keys
        self._signal = _EndSignal(self)
        self._on_end = _WeakEnd(self._signal)
        # Optional in custom strategies: without watch() a Session stays until remove().
        self._strategy_watch: t.Callable[..., bool] | None = getattr(strategy, "watch", None)
        # Declared on the strategy's own class only (scopes.ENDLESS_KEY_TYPES):
        # a subclass may redefine watch() for keys its parent could not watch.
        self._endless_types: frozenset[type] = vars(type(strategy)).get(
            "endless_key_types", frozenset()
        )
        _reaper_signals.add(self._signal)
        from . import fork

        fork._hook()  # the child forgets what it inherits (signals are tracked)

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
        self._pop_current()

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

    def collect(self) -> int:
        """Retire ended scopes now and close their Sessions; return how many.

        Runs database I/O: call it from ordinary code, never from a callback.
        When it returns, no Session retired before the call is still being
        closed by the reaper thread.
        """
        lock = _reaper_lock
        if lock is None:
            self._sweep()
            return self._close_retired()
        with lock:  # wait for a close the reaper has in flight
            self._sweep()
            return self._close_retired()

    def close_all(self) -> int:
        """Close every Session that is not busy, empty the registry of them.

        For process shutdown and tests. A Session whose connection is in the
        middle of a statement in another greenlet (psycopg2 under
        :func:`scoping.green.patch_psycopg2`, or psycopg 3) is *busy*:
        touching it would block the OS thread, and so the gevent hub, until
        the statement ends. Busy Sessions are skipped (left to their scope,
        which removes them or is cleaned up when it ends) and logged, so
        ``close_all()`` returns in bounded time. Every other Session is
        closed even when some ``close()`` fails; the first failure is raised
        at the end. Returns the number of Sessions closed. Scopes stay
        watched, so calling it often adds no callbacks.
        """
        busy = 0
        for key, obj in list(self.registry.items()):
            if _is_busy(obj):
                busy += 1
                continue
            if self.registry.get(key) is obj:
                self._discard(key)
                self._retired.append(obj)
        if busy:
            log.warning(
                "close_all() skipped %d Session(s) busy in a statement in another greenlet; "
                "they are closed when their scopes end",
                busy,
            )
        lock = _reaper_lock
        if lock is None:
            return self._close_retired(raise_errors=True)
        with lock:  # and wait for a close the reaper has in flight
            return self._close_retired(raise_errors=True)

    def miss_handler(
        self, fast_key_is_key: bool | t.Callable[[t.Any], bool] | None
    ) -> t.Callable[[t.Hashable], _T]:
        """What a session's hot path calls on a miss, with the fast key it computed.

        :param fast_key_is_key: :func:`scoping.scopes.fast_key_rule`'s answer:
          ``True``, the Session is made for that key at once; a function, made
          for it when the function says it is the key; None, the strategy's
          ``current()`` decides, as ``Registry()`` does.
        """
        if fast_key_is_key is True:
            return self._create
        if fast_key_is_key is None or fast_key_is_key is False:
            return self._miss_by_current
        is_key = fast_key_is_key
        create = self._create

        def checked_miss(key: t.Hashable) -> _T:
            if is_key(key):
                return create(key)
            return self()  # not the key: current() decides

        return checked_miss

    def _miss_by_current(self, key: t.Hashable) -> _T:
        return self()  # the fast key may not be the key: current() decides

    # -- internals -------------------------------------------------------------

    def _pop_current(self) -> _T | None:
        """Take the current scope's object out of the registry and return it."""
        try:
            key = self.scopefunc()
        except NoScopeToken:
            return None
        try:
            return self._discard(key)
        except TypeError:
            check_hashable(key, self.strategy)
            raise

    def _discard(self, key: t.Hashable) -> _T | None:
        """Take the object of scope ``key`` out of the registry and return it."""
        if self._watched.get(key) is False:
            # A polled scope is watched again if it makes a new object; a
            # signalled one stays watched, so its callback is not added twice.
            self._watched.pop(key, None)
        return self.registry.pop(key, None)

    # -- cleanup machinery -----------------------------------------------------

    def _create(self, key: t.Hashable) -> _T:
        self._created += 1
        if self._created >= self._sweep_at:
            self._sweep()
        if self._retired:
            self._close_retired()
        if not _reaper_checked:
            _ensure_reaper()
        obj = self.createfunc()
        current = self.registry.setdefault(key, obj)
        # _watch's own first test, saving a call per Session; then a key whose
        # end no one can see (a request id, strategy-declared) is not watched.
        if key not in self._watched and type(key) not in self._endless_types:
            self._watch(key)
        return current

    def _watch(self, key: t.Hashable) -> None:
        if key in self._watched:
            return
        watch = self._strategy_watch
        if watch is None:  # no end the registry can see: kept until remove()
            self._watched[key] = True
            return
        self._watched[key] = True  # claim first: watch() may signal at once
        try:
            signalled = bool(watch(key, self._on_end))
        except Exception as exc:
            self._watched.pop(key, None)
            self.registry.pop(key, None)
            raise ScopingError(
                f"{self.strategy!r}.watch() raised {exc!r}, so the Session of scope {key!r} "
                f"was not kept: fix watch(), or make it return False to have is_ended() "
                f"polled instead"
            ) from exc
        if key in self._watched:  # not already ended
            self._watched[key] = signalled
            # Polling can only see the end of a greenlet key (raw greenlets);
            # other unsignalled keys (tokens) end by remove() or their block.
            if (
                not signalled
                and not self._polling
                and isinstance(key, _units._greenlet_type or _units.greenlet_type())
            ):
                self._start_polling()

    def _scope_ended(self, key: t.Hashable) -> None:
        # Retire: runs in callbacks of every kind, so no I/O and no locks.
        self._watched.pop(key, None)
        obj = self.registry.pop(key, None)
        if obj is None:
            return
        self._retired.append(obj)
        self._schedule_cleanup()

    def _poll_later(self, key: t.Hashable) -> None:
        # The strategy says the key may have ended: poll it (no I/O here).
        if key in self._watched:
            self._watched[key] = False
            if not self._polling:
                self._start_polling()

    def _start_polling(self) -> None:
        """Have unsignalled scopes polled even if nothing touches the registry.

        May run in callbacks: it only queues work (a reaper wake-up, or a
        gevent greenlet that polls once a second while polled scopes remain).
        """
        self._polling = True
        modules = _modules
        gevent = modules.get("gevent") if modules is not None else None
        if gevent is not None and _units.threading_is_patched():
            gevent.spawn(self._poll_green)
        else:
            _wake_reaper(self._signal)

    def _poll_green(self) -> None:
        import gevent

        try:
            while self._polled():
                gevent.sleep(POLL_INTERVAL)
                self._sweep()
                self._close_retired()
        finally:
            self._polling = False

    def _sweep(self) -> None:
        self._created = 0
        is_ended = getattr(self.strategy, "is_ended", None) or _never
        polled = [key for key, signalled in list(self._watched.items()) if not signalled]
        glet_type = _units.greenlet_type()
        for key in polled:
            if is_ended(key) or (isinstance(key, glet_type) and self._abandoned(key)):
                self._scope_ended(key)
        key = None  # drop the last greenlet reference before it is collected
        # Sweep again after as many creations as there are polled scopes left,
        # so the cost per creation stays constant.
        self._sweep_at = max(_MIN_SWEEP, len(polled))

    def _polled(self) -> bool:
        return False in self._watched.values()

    def _abandoned(self, glet: t.Any) -> bool:
        """A suspended greenlet nobody else references can never run again."""
        if glet.parent is None or not glet:  # a main greenlet, or not started
            return False
        # References: the registry dict, _watched, the sweep's list, its loop
        # variable, this argument and getrefcount's own.
        held = 5 + (glet in self.registry)
        return sys.getrefcount(glet) <= held

    def _close_retired(self, raise_errors: bool = False) -> int:
        closed = 0
        first_error: Exception | None = None
        retired = self._retired
        guard = _modules.get("scoping.guard")
        guard_release = guard.SessionGuard.release if guard is not None else None
        while True:
            try:
                obj = retired.popleft()
            except IndexError:
                break
            if guard_release is not None:
                guard_release(obj)
            try:
                obj.close()
            except Exception as exc:
                if raise_errors and first_error is None:
                    first_error = exc
                log.warning("closing the Session of an ended scope failed", exc_info=True)
            except BaseException:
                # KeyboardInterrupt, GreenletExit, gevent.Timeout: the close did
                # not finish. Keep the Session queued so the next drain closes it.
                retired.appendleft(obj)
                raise
            closed += 1
        if first_error is not None:
            raise first_error
        return closed

    def _schedule_cleanup(self) -> None:
        """Drain the queue soon, from an ordinary greenlet or thread, not here."""
        if self._cleanup_pending:
            return
        modules = _modules
        if modules is None:  # interpreter shutdown  # type: ignore[comparison-overlap]
            return
        gevent = modules.get("gevent")
        if gevent is not None and _units.threading_is_patched():
            self._cleanup_pending = True
            gevent.spawn(self._cleanup)
            return
        _wake_reaper(self._signal)

    def _cleanup(self) -> None:
        self._cleanup_pending = False
        self._close_retired()

    def _forget_inherited(self) -> list[t.Any]:
        """In a forked child: drop every inherited Session without touching it."""
        kept: list[t.Any] = [*self.registry.values(), *self._retired]
        self.registry.clear()
        self._retired.clear()
        self._watched.clear()
        self._cleanup_pending = False
        self._polling = False
        self._created = 0
        return kept


def _never(key: t.Hashable) -> bool:
    return False


def _is_busy(session: t.Any) -> bool:
    """Is a statement running on one of ``session``'s connections right now?"""
    transaction = getattr(session, "_transaction", None)
    connections = getattr(transaction, "_connections", None)
    if not connections:
        return False
    green = _modules.get("scoping.green")
    for entry in list(connections.values()):
        try:
            dbapi = entry[0].connection.dbapi_connection
        except Exception:
            continue
        if dbapi is None:
            continue
        if green is not None and green.is_waiting(dbapi):
            return True
        isexecuting = getattr(dbapi, "isexecuting", None)
        if isexecuting is not None and isexecuting():
            return True
        pgconn = getattr(dbapi, "pgconn", None)  # psycopg 3: 1 is TRANSACTION_ACTIVE
        if pgconn is not None and pgconn.transaction_status == 1:
            return True
    return False


# --- the reaper: closes retired Sessions when nothing else touches a registry --

_reaper_queue: t.Any = None  # queue.SimpleQueue, made with the reaper
_reaper_lock: t.Any = None  # held by the reaper while it closes; made with it
_reaper_checked = False  # decided once per process (and again in a forked child)
_reaper_signals: weakref.WeakSet[_EndSignal] = weakref.WeakSet()


def _ensure_reaper() -> None:
    """Start the reaper thread once per process (not under gevent's threading).

    Under gevent, cleanup greenlets do its work (Registry._schedule_cleanup).
    """
    global _reaper_checked
    _reaper_checked = True
    if _reaper_queue is not None or _units.threading_is_patched():
        return
    _start_reaper()


def _start_reaper() -> None:
    global _reaper_queue, _reaper_lock
    import queue
    import threading

    q: queue.SimpleQueue[_EndSignal | None] = queue.SimpleQueue()
    _reaper_lock = threading.Lock()
    _reaper_queue = q
    thread = threading.Thread(target=_reap, args=(q,), name="scoping-reaper", daemon=True)
    thread.start()


def _wake_reaper(signal: _EndSignal) -> None:
    # SimpleQueue.put is reentrant: safe in weakref and GC callbacks.
    q = _reaper_queue
    if q is not None:
        q.put(signal)


def _reap(q: t.Any) -> None:
    import queue

    signals = _reaper_signals
    while True:
        polling = [s for s in list(signals) if s.registry is not None and s.registry._polling]
        try:
            signal = q.get(timeout=POLL_INTERVAL if polling else None)
        except queue.Empty:
            signal = None
        if q is not _reaper_queue:  # forked child: this thread is gone anyway
            return
        if _units.threading_is_patched():
            continue  # gevent patched threading after we started: its greenlets clean up
        todo = {signal, *polling} if signal is not None else set(polling)
        for s in todo:
            registry = s.registry
            if registry is None:
                continue
            try:
                with _reaper_lock:
                    if registry._polling:
                        registry._sweep()
                        if not registry._polled():
                            registry._polling = False
                    registry._close_retired()
            except BaseException:  # pragma: no cover - _close_retired logs
                log.warning("scoping's reaper thread failed to close a Session", exc_info=True)
        del signal, todo, registry


def _reaper_after_fork() -> None:
    global _reaper_queue, _reaper_checked, _reaper_lock
    _reaper_queue = None
    _reaper_lock = None  # may have been held by the reaper thread at fork time
    _reaper_checked = False
