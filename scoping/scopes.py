"""Scope strategies: what "the current scope" means for a scoped Session.

A strategy answers one question fast: *which scope is running now?*
(:meth:`ScopeStrategy.current` returns a hashable key). It may also say when a
scope ends (:meth:`~ScopeStrategy.watch`, :meth:`~ScopeStrategy.is_ended`), so
the :class:`~scoping.Registry` can close the Session of a scope that forgot
``remove()``.

==============  ============================================  ====================
strategy        one Session per ...                           scope ends when
==============  ============================================  ====================
``thread``      thread, as :mod:`threading` defines it *when   the thread or
                the Session is used*: an OS thread, or a       greenlet ends
                greenlet once gevent has patched threading
``greenlet``    greenlet (each OS thread's main greenlet       the greenlet ends
                counts, so plain threads are covered)
``contextvar``  execution context (:class:`contextvars.       the context is freed
                Context`); a child started with a *copy* of    or the greenlet/task
                its creator's context gets its own Session     that made it ends
``token``       token bound by ``Session.scope(token)`` or     the outermost
                returned by ``scopefunc``                      ``scope()`` exits
``auto``        asyncio task inside a running task, else       the task or greenlet
                greenlet (else thread without greenlet)        ends
==============  ============================================  ====================

Nothing here touches :mod:`threading` attributes, gevent or asyncio at import
time: every decision is taken when a Session is used, so building a strategy
before ``gevent.monkey.patch_all()`` is safe.

Keys are never ``id()`` values or ``get_ident()`` results of things that can
die while their key is still in use: greenlet, task and thread keys are the
objects themselves, held until the registry hears they ended.
"""

from __future__ import annotations

import contextvars
import sys
import threading
import typing as t
import warnings
import weakref

from .errors import NoScopeToken, ScopingWarning

if t.TYPE_CHECKING:
    from greenlet import greenlet as Greenlet

__all__ = [
    "AutoScope",
    "BaseScope",
    "ContextVarScope",
    "GreenletScope",
    "ScopeStrategy",
    "ThreadScope",
    "TokenScope",
    "strategy_for",
]

OnEnd = t.Callable[[t.Hashable], None]
"""Called with a key once its scope has ended. It only queues work: it may run
in a garbage-collector or weakref callback, in a gevent hub callback or in
another thread, so it never does I/O."""


@t.runtime_checkable
class ScopeStrategy(t.Protocol):
    """What a scope strategy provides. Implement it for your own unit of work
    (a framework request object, a Celery task id, ...).

    Only :meth:`current` is on the hot path: it runs on every proxied call.
    """

    name: str

    def current(self) -> t.Hashable:
        """Return the key of the scope running now."""

    def watch(self, key: t.Hashable, on_end: OnEnd) -> bool:
        """Arrange for ``on_end(key)`` once the scope ``key`` ends.

        Return ``False`` when the end cannot be signalled; the registry then
        polls :meth:`is_ended` from time to time.
        """

    def is_ended(self, key: t.Hashable) -> bool:
        """Return ``True`` when the scope ``key`` can never run again."""


class BaseScope:
    """Convenience base: subclasses implement :meth:`current`.

    When a key is a greenlet or an asyncio task, its end is watched (see
    :func:`watch_unit`); any other key (a request id, a task name) has no end
    the registry can see, and its Session stays until ``remove()``, as with
    SQLAlchemy's own ``scoped_session``.
    """

    __slots__ = ()
    name: str = "custom"

    def current(self) -> t.Hashable:
        raise NotImplementedError

    def watch(self, key: t.Hashable, on_end: OnEnd) -> bool:
        return watch_unit(key, lambda: on_end(key))

    def is_ended(self, key: t.Hashable) -> bool:
        return unit_ended(key)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# --- ends of greenlets, tasks and threads -----------------------------------


def _getcurrent() -> t.Callable[[], Greenlet]:
    from greenlet import getcurrent

    return t.cast("t.Callable[[], Greenlet]", getcurrent)


_greenlet_type: t.Any = None  # greenlet.greenlet, bound at first use


def _load_greenlet_type() -> t.Any:
    global _greenlet_type
    from greenlet import greenlet

    _greenlet_type = greenlet
    return greenlet


def watch_unit(unit: object, callback: t.Callable[[], None]) -> bool:
    """Call ``callback()`` when ``unit`` (a greenlet or asyncio task) ends.

    gevent greenlets signal through ``rawlink`` (run by the hub), asyncio
    tasks through ``add_done_callback`` (run by the loop), and an OS thread's
    main greenlet when the thread exits (a native thread-local is cleared).
    Must be called from within ``unit``. Raw greenlets cannot signal: return
    ``False`` so they are polled with :func:`unit_ended`; so is anything else.
    Exact types, no duck typing: a user's token that happens to have a
    ``rawlink``, ``add_done_callback`` or ``parent`` attribute is just a token.
    """
    if isinstance(unit, _greenlet_type or _load_greenlet_type()):
        rawlink = getattr(unit, "rawlink", None)
        if rawlink is not None:  # gevent.Greenlet
            rawlink(lambda _glet: callback())
            return True
        if unit.parent is None:  # a thread's main greenlet
            on_thread_exit(callback)
            return True
        return False
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and isinstance(unit, asyncio.Future):
        unit.add_done_callback(lambda _task: callback())
        return True
    return False


class _ThreadMarker:
    __slots__ = ("__weakref__",)


_native_local: t.Any = None  # made at first use, from the unpatched class
_thread_refs: set[weakref.ref[_ThreadMarker]] = set()


def on_thread_exit(callback: t.Callable[[], None]) -> None:
    """Call ``callback()`` when the current OS thread exits.

    A marker lives in a native (never gevent-patched) thread-local; CPython
    drops it while the thread is torn down, before ``Thread.join()`` returns,
    and its weakref callback runs the callbacks. They must not do I/O.
    """
    global _native_local
    local = _native_local
    if local is None:
        monkey = sys.modules.get("gevent.monkey")
        if monkey is not None and monkey.is_module_patched("threading"):
            cls = monkey.get_original("_thread", "_local")
        else:
            import _thread

            cls = _thread._local
        local = _native_local = cls()
    try:
        callbacks: list[t.Callable[[], None]] = local.callbacks
    except AttributeError:
        callbacks = local.callbacks = []
        marker = local.marker = _ThreadMarker()

        def thread_exited(ref: weakref.ref[_ThreadMarker]) -> None:
            _thread_refs.discard(ref)
            for cb in callbacks:
                cb()

        _thread_refs.add(weakref.ref(marker, thread_exited))
    callbacks.append(callback)


def unit_ended(unit: object) -> bool:
    """``True`` once a greenlet is dead or an asyncio task is done."""
    if isinstance(unit, _greenlet_type or _load_greenlet_type()):
        return bool(unit.dead)
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and isinstance(unit, asyncio.Future):
        return bool(unit.done())
    return False


# --- strategies --------------------------------------------------------------


class GreenletScope(BaseScope):
    """One Session per greenlet.

    Unit of isolation: :func:`greenlet.getcurrent`. A thread that never
    switches greenlets is its main greenlet, so plain threaded apps are
    covered. The key is the greenlet object itself (never its ``id``), so a
    new greenlet can never inherit a dead one's Session.

    Cost: one C call per lookup. Cleanup: gevent greenlets through
    ``rawlink`` at the moment they finish; raw greenlets and threads by polling
    ``greenlet.dead`` as new Sessions are created.
    """

    __slots__ = ("current",)
    name = "greenlet"

    def __init__(self) -> None:
        # greenlet.getcurrent is never patched by gevent: binding it is safe.
        self.current: t.Callable[[], t.Hashable] = _getcurrent()


def _threading_is_patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return False
    return bool(monkey.is_module_patched("threading"))


class ThreadScope(BaseScope):
    """One Session per thread, as :mod:`threading` defines it when used.

    Unit of isolation: an OS thread, or a greenlet once gevent has patched
    :mod:`threading`. The decision is re-taken whenever ``threading.local`` is
    replaced, so a Session built at import time, before
    ``gevent.monkey.patch_all()``, isolates greenlets afterwards.

    Without patching, raw greenlets (and ``patch_all(thread=False)``) share
    their thread's Session, as with SQLAlchemy's ``scoped_session``; use
    ``"greenlet"`` there.

    Cost: one module attribute check and one thread-local read per lookup.
    """

    __slots__ = ("current", "local_class")
    name = "thread"

    def __init__(self) -> None:
        getcurrent = _getcurrent()
        threading_module = threading
        self.local_class: object = None  # the threading.local last seen, for inspection
        # Resolved on first use and whenever threading.local is replaced,
        # never now. The state lives in the closure: the hot path then reads
        # no attributes of self.
        local_cls: object = None
        local: t.Any = None
        per_greenlet = False

        def resync() -> None:
            nonlocal local_cls, local, per_greenlet
            # Order matters: read the class first, so a patch that lands
            # between these lines is seen on the next call.
            new_cls: object = threading_module.local
            per_greenlet = _threading_is_patched()
            local = None if per_greenlet else threading_module.local()
            local_cls = self.local_class = new_cls

        def thread_key() -> t.Hashable:
            # The thread's main greenlet stands for the thread: it is dead
            # once the thread has ended, and it is never reused.
            glet = getcurrent()
            while glet.parent is not None:
                glet = glet.parent
            local.key = glet
            return t.cast(t.Hashable, glet)

        def current() -> t.Hashable:
            if threading_module.local is not local_cls:
                resync()
            if per_greenlet:
                return getcurrent()  # type: ignore[no-any-return]
            try:
                return local.key  # type: ignore[no-any-return]
            except AttributeError:
                return thread_key()

        self.current: t.Callable[[], t.Hashable] = current


class ContextVarScope(BaseScope):
    """One Session per execution context (:class:`contextvars.Context`).

    Unit of isolation: the Context that is current when the Session is used.
    An asyncio task, or a greenlet given ``gr_context = copy_context()``,
    runs in a *copy* of its creator's context, so it gets its own Session:
    copying a context never shares a Session. The same Context entered again
    with ``Context.run`` gets the same Session.

    Cost: one C call and one attribute read per lookup. Cleanup: when the
    Context is freed, or when the greenlet or task that created the Session
    ends, whichever comes first.
    """

    __slots__ = ("_getcurrent", "_probe", "_refs", "current")
    name = "contextvar"

    def __init__(self) -> None:
        getcurrent = self._getcurrent = _getcurrent()
        self._probe: contextvars.ContextVar[None] = contextvars.ContextVar(
            "scoping.ContextVarScope.probe"
        )
        # key -> (weak reference to the Context, the unit that created it)
        self._refs: dict[t.Hashable, tuple[weakref.ref[contextvars.Context], object]] = {}
        context = self._context
        _id = id

        def current() -> t.Hashable:
            ctx = getcurrent().gr_context
            if ctx is None:
                ctx = context()
            # A Context is unhashable; its id is safe as a key because the
            # entry is dropped by a weakref callback before the Context's
            # memory (and so its id) can be reused.
            return _id(ctx)

        # A closure, not a method: the hot path then reads no attributes.
        self.current: t.Callable[[], t.Hashable] = current

    def _context(self) -> contextvars.Context:
        ctx = self._getcurrent().gr_context
        if ctx is None:
            # This thread or greenlet has no Context object yet: setting any
            # variable makes one.
            self._probe.set(None)
            ctx = self._getcurrent().gr_context
        return t.cast(contextvars.Context, ctx)

    def watch(self, key: t.Hashable, on_end: OnEnd) -> bool:
        ctx = self._context()
        refs = self._refs

        def context_freed(_ref: object) -> None:
            refs.pop(key, None)
            on_end(key)

        unit = _current_unit(self._getcurrent)
        refs[key] = (weakref.ref(ctx, context_freed), unit)
        if getattr(unit, "parent", False) is None:
            # A thread's main greenlet may run many contexts over its life;
            # they die with their last reference (at the latest with the
            # thread), so the weakref alone signals, with no per-thread list.
            return True
        def owner_ended() -> None:
            # Drop the entry too: it holds the unit, and the unit its Context,
            # so neither could be freed while the entry exists.
            refs.pop(key, None)
            on_end(key)

        return watch_unit(unit, owner_ended)

    def is_ended(self, key: t.Hashable) -> bool:
        entry = self._refs.get(key)
        if entry is None:
            return True
        if entry[0]() is None or unit_ended(entry[1]):
            self._refs.pop(key, None)  # it holds the unit, which holds the Context
            return True
        return False


class _Unbound:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<no token>"


_UNBOUND: t.Final = _Unbound()


class TokenScope(BaseScope):
    """One Session per token that the application chooses.

    Unit of isolation: the token bound by ``Session.scope(token)`` in the
    current context, else what ``scopefunc()`` returns. Several greenlets may
    bind the same token on purpose and then share its Session; the Session is
    removed when the last ``scope(token)`` block for it exits.

    Tokens bound with ``scope()`` live in a :class:`~contextvars.ContextVar`, so
    a new greenlet or thread starts with no token. Tokens that are greenlets
    or tasks (``scopefunc=greenlet.getcurrent``) are cleaned up when they end,
    as :class:`BaseScope` does. Cost: one ContextVar read per lookup, plus the
    ``scopefunc`` call when no token is bound.
    """

    __slots__ = ("_bound", "scopefunc")
    name = "token"

    def __init__(self, scopefunc: t.Callable[[], t.Hashable] | None = None) -> None:
        if scopefunc is not None:
            _warn_if_ident(scopefunc)
        self.scopefunc = scopefunc
        self._bound: contextvars.ContextVar[t.Hashable] = contextvars.ContextVar(
            "scoping.TokenScope.bound", default=_UNBOUND
        )

    def current(self) -> t.Hashable:
        token = self._bound.get()
        if token is not _UNBOUND:
            return token
        if self.scopefunc is not None:
            return self.scopefunc()
        raise NoScopeToken(
            "no token is bound for this scope='token' session: wrap the unit of work in "
            "`with Session.scope(token):`, or pass scopefunc= to scoped_session()"
        )

    def bind(self, token: t.Hashable) -> contextvars.Token[t.Hashable]:
        """Make ``token`` current until :meth:`reset` is called with the result."""
        check_hashable(token, self)
        return self._bound.set(token)

    def reset(self, handle: contextvars.Token[t.Hashable]) -> None:
        """Restore the token that was current before :meth:`bind`."""
        self._bound.reset(handle)


class AutoScope(BaseScope):
    """Per asyncio task inside a running task, else per greenlet.

    Decided at each use, never at import: inside an asyncio task the key is
    the task; otherwise the current greenlet (which is the thread's main
    greenlet in a plain thread). Without the greenlet package it is per
    thread. Cost: one C call for the running loop, one for the greenlet.
    """

    __slots__ = ("current",)
    name = "auto"

    def __init__(self) -> None:
        from asyncio import current_task, events

        get_running_loop = events._get_running_loop
        try:
            getcurrent: t.Callable[[], t.Hashable] = _getcurrent()
        except ImportError:  # pragma: no cover - greenlet is a dependency
            getcurrent = ThreadScope().current

        def current() -> t.Hashable:
            loop = get_running_loop()
            if loop is not None:
                task = current_task(loop)
                if task is not None:
                    return task
            return getcurrent()

        # A closure, not a method: the hot path then reads no attributes.
        self.current: t.Callable[[], t.Hashable] = current


def _current_unit(getcurrent: t.Callable[[], Greenlet]) -> object:
    """The asyncio task running now, else the current greenlet."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        loop = asyncio.events._get_running_loop()
        if loop is not None:
            task = asyncio.current_task(loop)
            if task is not None:
                return task
    return getcurrent()


def check_hashable(token: object, strategy: object) -> None:
    """Raise a :class:`TypeError` that names the token's type and the strategy."""
    try:
        hash(token)
    except TypeError:
        name = getattr(strategy, "name", type(strategy).__name__)
        raise TypeError(
            f"scope key of type {type(token).__name__!r} is unhashable; the {name!r} "
            f"strategy keys Sessions by it: use a str, int, tuple or another hashable "
            f"token (for a request, its id)"
        ) from None


def _warn_if_ident(scopefunc: t.Callable[[], t.Hashable]) -> None:
    if getattr(scopefunc, "__name__", "") in {"get_ident", "get_native_id"}:
        warnings.warn(
            f"scopefunc={scopefunc.__module__}.{scopefunc.__name__} keys Sessions by a "
            "number that is reused once its thread or greenlet ends, so a new one can "
            "inherit a dead one's Session; use scope='thread' or scope='greenlet' instead",
            ScopingWarning,
            stacklevel=4,
        )


_NAMED: dict[str, t.Callable[[], ScopeStrategy]] = {
    "thread": ThreadScope,
    "greenlet": GreenletScope,
    "contextvar": ContextVarScope,
    "token": TokenScope,
    "auto": AutoScope,
}


def strategy_for(
    scope: str | ScopeStrategy, scopefunc: t.Callable[[], t.Hashable] | None = None
) -> ScopeStrategy:
    """Turn the ``scope=`` and ``scopefunc=`` arguments into a strategy object."""
    if scopefunc is not None:
        if scope not in ("auto", "token"):
            raise ValueError(
                f"scopefunc= gives a token strategy and cannot be combined with "
                f"scope={scope!r}: pass one or the other"
            )
        return TokenScope(scopefunc)
    if isinstance(scope, str):
        try:
            factory = _NAMED[scope]
        except KeyError:
            valid = ", ".join(repr(n) for n in _NAMED)
            raise ValueError(
                f"unknown scope strategy {scope!r}: use one of {valid}, or pass a "
                f"strategy object"
            ) from None
        return factory()
    if not callable(getattr(scope, "current", None)):
        raise TypeError(
            f"scope={scope!r} is neither a strategy name nor an object with a "
            f"current() method (see scoping.ScopeStrategy)"
        )
    return scope
