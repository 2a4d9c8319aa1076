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
``contextvar``  execution context (:class:`contextvars.       the context is freed,
                Context`); a child started with a *copy* of    or the greenlet/task
                its creator's context gets its own Session     that made it ends and
                                                               no one else holds it
``token``       token bound by ``Session.scope(token)`` or     the outermost
                returned by ``scopefunc``                      ``scope()`` exits
``auto``        execution context, as ``contextvar``: each     as ``contextvar``
                thread, greenlet, asyncio task and
                ``to_thread`` call runs in its own
==============  ============================================  ====================

:class:`TaskScope` (one Session per asyncio task, else per execution context)
is what :class:`scoping.asyncio.async_scoped_session` means by ``"auto"``:
an AsyncSession must be closed on its task's loop, when that task ends.

Nothing here touches :mod:`threading` attributes, gevent or asyncio at import
time: every decision is taken when a Session is used, so building a strategy
before ``gevent.monkey.patch_all()`` is safe.

Each strategy declares its hot-path key once, next to :meth:`current`:
``fast_key`` (a callable that returns ``current()``, or a value that is never
a registry key, which makes the caller fall back to ``current()``) and
``fast_key_kind`` (which of the few shapes :mod:`scoping.session` inlines).
``tests/test_lifecycle.py`` checks, in every runtime, that they agree.

Keys are never ``id()`` values or ``get_ident()`` results of things that can
die while their key is still in use: greenlet, task and thread keys are the
objects themselves, held until the registry hears they ended.
"""

from __future__ import annotations

import contextvars
import sys
import threading
import types
import typing as t
import uuid
import warnings
import weakref

from . import _units
from .errors import NoScopeToken, ScopeEnded, ScopingWarning

__all__ = [
    "ENDLESS_KEY_TYPES",
    "NO_CONTEXT_KEY",
    "STRATEGY_NAMES",
    "AutoScope",
    "BaseScope",
    "ContextVarScope",
    "GreenletScope",
    "ScopeStrategy",
    "TaskScope",
    "ThreadScope",
    "TokenScope",
    "strategy_for",
]

#: The names ``scope=`` accepts, in the order the docs list them.
STRATEGY_NAMES: t.Final[tuple[str, ...]] = ("thread", "greenlet", "contextvar", "token", "auto")

OnEnd = t.Callable[[t.Hashable], None]
"""Called with a key once its scope has ended. It only queues work: it may run
in a garbage-collector or weakref callback, in a gevent hub callback or in
another thread, so it never does I/O. The registry's callback also has a
``poll(key)`` method: "this key may have ended, check it with is_ended()
from time to time"."""

FastKeyKind = t.Literal["exact", "fast", "greenlet", "context", "token"]
"""How the session's hot path (:mod:`scoping._hot_path`) computes the key on a hit:

- ``"exact"``: ``fast_key()`` always equals ``current()``;
- ``"fast"``: ``fast_key()`` equals ``current()`` or is never a registry key
  (a miss, after which ``current()`` decides);
- ``"greenlet"`` and ``"context"``: as ``"fast"``, with ``fast_key()`` one of
  two shapes that the hot path writes inline: ``greenlet.getcurrent()``
  (GreenletScope, ThreadScope), and ``id(greenlet.getcurrent().gr_context)``
  (ContextVarScope, AutoScope);
- ``"token"``: as ``"exact"``, where the hot path reads the live binding of
  a ``scope(token)`` block inline (``read_binding()``) and calls
  ``fast_key()`` only without one (TokenScope without a ``scopefunc``).

A ``"greenlet"`` or ``"context"`` strategy may say when its fast key *is*
the key, so that a miss makes the Session with no ``current()`` call:
``fast_key_is_key`` is ``True`` (always: GreenletScope) or a function of the
fast key (ThreadScope: a thread's main greenlet, or any greenlet once
threading is patched; ContextVarScope: any key but :data:`NO_CONTEXT_KEY`).
Without it, every miss asks ``current()``. :func:`fast_key_rule` reads it.
"""


NO_CONTEXT_KEY: t.Final = id(None)
"""The ``"context"`` fast key of a greenlet that has no Context yet: never a key
(``gr_context`` is None until the greenlet has one), so a lookup with it
misses and ``current()`` makes the Context."""


ENDLESS_KEY_TYPES: t.Final[frozenset[type]] = frozenset(
    {str, bytes, int, float, tuple, frozenset, uuid.UUID}
)
"""Key types that are never a unit (greenlet, task), so :meth:`BaseScope.watch`
can never signal their end nor :meth:`BaseScope.is_ended` see it.

A strategy class that keeps ``BaseScope``'s ``watch``/``is_ended`` may declare
them as its own ``endless_key_types``: the registry then skips ``watch()``
for keys of exactly these types (subclasses, such as a ``str`` subclass, are
still watched). :class:`TokenScope` does, which saves a request-id token the
watch on every request.
"""


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
    :func:`scoping._units.watch_unit`); any other key (a request id, a task
    name) has no end the registry can see, and its Session stays until
    ``remove()``, as with SQLAlchemy's own ``scoped_session``.
    """

    __slots__ = ()
    name: str = "custom"
    #: How :mod:`scoping.session` computes the key on a hit (see FastKeyKind).
    fast_key_kind: FastKeyKind = "exact"

    @property
    def fast_key(self) -> t.Callable[[], t.Hashable]:
        """A callable returning ``current()`` (or a never-present key: a miss)."""
        return self.current

    def current(self) -> t.Hashable:
        raise NotImplementedError

    def watch(self, key: t.Hashable, on_end: OnEnd) -> bool:
        return _units.watch_unit(key, on_end)

    def unwatch(self, key: t.Hashable, on_end: OnEnd) -> bool:
        """Take back ``watch(key, on_end)`` if it can be (a task's done-callback).

        Optional, and only asked by :class:`scoping.asyncio.AsyncRegistry`
        when ``remove()`` or a ``scope()`` block ends a task's Session: the
        ended task then costs the loop no callback. ``False`` keeps the key
        watched, as before.
        """
        return _units.unwatch_unit(key, on_end)

    def is_ended(self, key: t.Hashable) -> bool:
        return _units.unit_ended(key)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def _install_key_functions(
    strategy: t.Any, current: t.Callable[[], t.Hashable], fast_key: t.Callable[[], t.Hashable]
) -> None:
    """Give ``strategy`` its key closures, in its class's ``current`` and ``fast_key`` slots.

    Closures, not methods: the hot path then reads no attribute of the
    strategy. A subclass's own ``current()`` is its rule and is kept (the
    slot is set through its descriptor, so nothing on the instance hides the
    method, and a slotted subclass can be built); ``super().current()`` still
    reaches the built-in key, and ``fast_key`` calls the subclass's
    ``current()``, unless the subclass defines ``fast_key`` too.
    """
    cls = type(strategy)
    slot: t.Any = _slot(cls, "current")
    slot.__set__(strategy, current)
    if _first_found(cls, "current") is not slot:
        fast_key = strategy.current  # the subclass's own method
    fast_slot: t.Any = _slot(cls, "fast_key")
    subclass_defines_fast_key = _first_found(cls, "fast_key") is not fast_slot
    if not subclass_defines_fast_key:
        fast_slot.__set__(strategy, fast_key)


def _slot(cls: type, name: str) -> t.Any:
    """The slot descriptor ``name`` that a built-in strategy class in ``cls``'s MRO declares."""
    for klass in cls.__mro__:
        member = vars(klass).get(name)
        if isinstance(member, types.MemberDescriptorType):
            return member
    raise AssertionError(f"{cls.__name__} has no {name!r} slot")  # pragma: no cover


def _first_found(cls: type, name: str) -> object:
    """What attribute lookup on an instance of ``cls`` finds first for ``name``."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return vars(klass)[name]
    return None


# --- strategies --------------------------------------------------------------


class GreenletScope(BaseScope):
    """One Session per greenlet.

    Unit of isolation: :func:`greenlet.getcurrent`. A thread that never
    switches greenlets is its main greenlet, so plain threaded apps are
    covered. The key is the greenlet object itself (never its ``id``), so a
    new greenlet can never inherit a dead one's Session.

    Cost: one C call per lookup. Cleanup: gevent greenlets through
    ``rawlink`` at the moment they finish, threads when they exit; raw
    greenlets by polling ``greenlet.dead`` (as new Sessions are created, by
    ``collect()``, and once a second while any are live), and an abandoned
    suspended raw greenlet (no reference left but the registry's) is then
    let go, so its ``finally`` blocks run.

    Lifecycle: fork, the child forgets every inherited Session without
    touching it (:mod:`scoping.fork`); thread hop (``to_thread``), the
    executor thread's Session, shared by every task it serves; a child
    greenlet given a copied context is its own greenlet, so its own Session;
    kill ends the greenlet like a normal exit.
    """

    __slots__ = ("current", "fast_key")
    name = "greenlet"
    fast_key_kind: FastKeyKind = "greenlet"
    #: The running greenlet is always the key (see FastKeyKind).
    fast_key_is_key: t.ClassVar[bool] = True

    def __init__(self) -> None:
        # greenlet.getcurrent is never patched by gevent: binding it is safe.
        getcurrent = _units.getcurrent()
        _install_key_functions(self, getcurrent, getcurrent)


class ThreadScope(BaseScope):
    """One Session per thread, as :mod:`threading` defines it when used.

    Unit of isolation: an OS thread, or a greenlet once gevent has patched
    :mod:`threading`. The decision is re-taken whenever ``threading.local`` is
    replaced, so a Session built at import time, before
    ``gevent.monkey.patch_all()``, isolates greenlets afterwards.

    Without patching, raw greenlets (and ``patch_all(thread=False)``) share
    their thread's Session, as with SQLAlchemy's ``scoped_session``; use
    ``"greenlet"`` there. ``asyncio.to_thread`` work shares the executor
    thread's Session with every task that thread serves: use ``"auto"``.

    Cost: a hit is one C call (``greenlet.getcurrent()``: the running
    greenlet is the key when it is the thread's main greenlet, or when
    threading is patched); otherwise one module attribute check and one
    thread-local read. Cleanup: when the thread (or, patched, the greenlet)
    ends, by the reaper thread (or a gevent cleanup greenlet), within
    milliseconds even if nothing else touches the registry.

    Lifecycle: fork, the child forgets inherited Sessions (the forking
    thread's included) without touching them; a child that copies the
    context shares the Session only if it runs in the same thread (or,
    patched, the same greenlet); kill or cancel ends the unit as a normal
    exit does.
    """

    __slots__ = ("current", "fast_key", "fast_key_is_key")
    name = "thread"
    fast_key_kind: FastKeyKind = "greenlet"

    def __init__(self) -> None:
        getcurrent = _units.getcurrent()
        threading_module = threading
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
            per_greenlet = _units.threading_is_patched()
            local = None if per_greenlet else threading_module.local()
            local_cls = new_cls

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

        def fast_key_is_key(glet: t.Any) -> bool:
            # A thread's main greenlet is its own key; so is every greenlet
            # once threading is patched, if that is still how current() last
            # found it (else current() decides, and resyncs).
            return glet.parent is None or (per_greenlet and threading_module.local is local_cls)

        # Keys are main greenlets (one per thread) or, patched, greenlets: the
        # running greenlet is either the key or not a key at all (a raw
        # greenlet of an unpatched thread, whose key is its main greenlet).
        _install_key_functions(self, current, getcurrent)
        #: Is the running greenlet (the fast key) the key? (see FastKeyKind)
        self.fast_key_is_key: t.Callable[[t.Any], bool] = fast_key_is_key


def _holds_context(unit: object, ctx: contextvars.Context) -> bool:
    """Does the (ended) ``unit`` object still hold ``ctx``?"""
    if isinstance(unit, _units.greenlet_type()):
        return unit.gr_context is ctx  # a dead greenlet keeps its Context
    get_context = getattr(unit, "get_context", None)  # asyncio.Task, 3.12+
    if get_context is not None:
        return get_context() is ctx
    return True  # a Task holds its Context until it is freed


class ContextVarScope(BaseScope):
    """One Session per execution context (:class:`contextvars.Context`).

    Unit of isolation: the Context that is current when the Session is used.
    An asyncio task, or a greenlet given ``gr_context = copy_context()``,
    runs in a *copy* of its creator's context, so it gets its own Session:
    copying a context never shares a Session. The same Context entered again
    with ``Context.run`` (or shared by two tasks or greenlets) gets the same
    Session. ``asyncio.to_thread`` and ``run_in_executor`` with a copied
    context run in their own Context, so their own Session.

    Cost: one C call and one attribute read per lookup. Cleanup: when the
    Context is freed; or when the greenlet or task that created the Session
    ends and nothing else holds its Context (a Context shared with a live
    unit keeps its Session until that one lets go). Cancel or kill ends the
    unit like a normal exit. Abandoned suspended greenlets are never held by
    the registry (it holds units and Contexts weakly), so they are collected
    and their ``finally`` blocks run. Fork: the child forgets inherited
    Sessions.
    """

    __slots__ = ("_getcurrent", "_probe", "_refs", "current", "fast_key")
    name = "contextvar"
    fast_key_kind: FastKeyKind = "context"
    #: The running Context's id is the key, unless the greenlet has no
    #: Context yet (see FastKeyKind); a C call, no Python frame.
    fast_key_is_key: t.ClassVar[t.Callable[[object], bool]] = NO_CONTEXT_KEY.__ne__

    def __init__(self) -> None:
        getcurrent = self._getcurrent = _units.getcurrent()
        self._probe: contextvars.ContextVar[None] = contextvars.ContextVar(
            "scoping.ContextVarScope.probe"
        )
        # key -> (weak reference to the Context, weak reference to the unit
        # that created the Session, or None for a thread's main greenlet)
        self._refs: dict[
            t.Hashable, tuple[weakref.ref[contextvars.Context], weakref.ref[t.Any] | None]
        ] = {}
        context = self._context
        _id = id

        def fast_key() -> t.Hashable:
            # A Context is unhashable; its id is safe as a key because the
            # entry is dropped by a weakref callback before the Context's
            # memory (and so its id) can be reused. gr_context is None until
            # the greenlet has a Context: id(None) is never a key (a miss).
            return _id(getcurrent().gr_context)

        def current() -> t.Hashable:
            ctx = getcurrent().gr_context
            if ctx is None:
                ctx = context()
            return _id(ctx)

        _install_key_functions(self, current, fast_key)

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

        unit = _units.current_unit()
        if getattr(unit, "parent", False) is None:
            # A thread's main greenlet may run many contexts over its life;
            # they die with their last reference (at the latest with the
            # thread), so the weakref alone signals, with no per-thread list.
            refs[key] = (weakref.ref(ctx, context_freed), None)
            return True
        # The unit is held weakly: a dead greenlet holds its Context, so a
        # strong reference here would keep both alive for good.
        refs[key] = (weakref.ref(ctx, context_freed), weakref.ref(unit))
        del ctx

        def owner_ended(_unit: object) -> None:
            if self.is_ended(key):
                on_end(key)
                return
            poll = getattr(on_end, "poll", None)
            if poll is not None:  # shared with a live unit: check again later
                poll(key)

        return _units.watch_unit(unit, owner_ended)

    def is_ended(self, key: t.Hashable) -> bool:
        entry = self._refs.get(key)
        if entry is None:
            return True
        ctx = entry[0]()
        if ctx is None:
            self._refs.pop(key, None)
            return True
        if entry[1] is None:
            return False  # a thread's main greenlet: only the Context's end counts
        unit = entry[1]()
        if unit is not None and not _units.unit_ended(unit):
            return False
        # The unit that made the Session is over. The scope is over too unless
        # something else holds the Context (another live task or greenlet
        # sharing it, or code that may run it again). Counted here: `ctx`,
        # getrefcount's argument, and the ended unit itself.
        held = 2 + (unit is not None and _holds_context(unit, ctx))
        if sys.getrefcount(ctx) > held:
            return False
        self._refs.pop(key, None)
        return True


class _Binding:
    """One ``bind()``: the token, and the identity of the block that bound it.

    A child that copied its parent's context holds the parent's binding; once
    that block has exited the binding is dead (``live`` is False), even if
    another block has bound an equal token since.
    """

    __slots__ = ("__weakref__", "live", "token")

    def __init__(self, token: t.Hashable) -> None:
        self.token = token
        self.live = True


class TokenScope(BaseScope):
    """One Session per token that the application chooses.

    Unit of isolation: the token bound by ``Session.scope(token)`` in the
    current context, else what ``scopefunc()`` returns. Several greenlets may
    bind the same token on purpose and then share its Session; the Session is
    removed when the last ``scope(token)`` block for it exits.

    Tokens bound with ``scope()`` live in a :class:`~contextvars.ContextVar`, so
    a new greenlet or thread starts with no token, and a task or greenlet that
    *copies* the context inherits it. The binding is that block's own: a
    child that outlives its parent's block gets :class:`~scoping.ScopeEnded`
    on its next use (never a Session nobody would remove, nor the Session of
    a later block that bound an equal token). Tokens that are greenlets or tasks
    (``scopefunc=greenlet.getcurrent``) are cleaned up when they end, as
    :class:`BaseScope` does. A ``scopefunc`` that returns ``None`` raises
    :class:`~scoping.NoScopeToken`.

    Cost: one ContextVar read per lookup (made inline by the proxies when
    there is no ``scopefunc``), plus the ``scopefunc`` call when no token is
    bound. Fork: the child forgets inherited Sessions.
    """

    __slots__ = ("_bound", "current", "fast_key", "read_binding", "scopefunc")
    name = "token"
    fast_key_kind: FastKeyKind = "token"  # "exact" over a scopefunc: see fast_key_kind()
    #: Exact key types whose end no strategy of this class can see (see
    #: :data:`ENDLESS_KEY_TYPES`): a request id's Session lives until
    #: ``remove()`` or its ``scope()`` block exits, and the registry keeps no
    #: watch bookkeeping for it. Read from the strategy's own class only.
    endless_key_types: t.ClassVar[frozenset[type]] = ENDLESS_KEY_TYPES

    def __init__(self, scopefunc: t.Callable[[], t.Hashable] | None = None) -> None:
        if scopefunc is not None:
            if not callable(scopefunc):
                raise TypeError(
                    f"scopefunc={scopefunc!r} is not callable: pass a function that returns "
                    f"the current scope's key, or scope='token' and Session.scope(token)"
                )
            _warn_if_ident(scopefunc)
        self.scopefunc = scopefunc
        self._bound: contextvars.ContextVar[_Binding | None] = contextvars.ContextVar(
            "scoping.TokenScope.bound", default=None
        )
        bound = self._bound.get
        #: The current context's binding (``.token``, ``.live``), or None: a
        #: C call the hot path makes inline ("token" key shape).
        self.read_binding: t.Callable[[], _Binding | None] = bound

        def current() -> t.Hashable:
            binding = bound()
            if binding is not None:
                if binding.live:
                    return binding.token
                raise ScopeEnded(
                    f"token {binding.token!r} is bound in this context, but the "
                    f"`Session.scope(...)` block that bound it has exited: this task or "
                    f"greenlet copied the block's context and outlived it. Open its own "
                    f"`with Session.scope(token):` block, or finish child work before the "
                    f"parent's block exits"
                )
            if scopefunc is not None:
                token = scopefunc()
                if token is None:
                    raise NoScopeToken(
                        f"scopefunc {getattr(scopefunc, '__qualname__', scopefunc)!r} "
                        f"returned None, which would give every caller one shared Session: "
                        f"make it return a key for every unit of work, or raise when there "
                        f"is none"
                    )
                return token
            raise NoScopeToken(
                "no token is bound for this scope='token' session: wrap the unit of work in "
                "`with Session.scope(token):`, or pass scopefunc= to scoped_session()"
            )

        _install_key_functions(self, current, current)

    def bind(self, token: t.Hashable) -> contextvars.Token[_Binding | None]:
        """Make ``token`` current until :meth:`reset` is called with the result."""
        try:
            hash(token)
        except TypeError:
            check_hashable(token, self)  # raises, naming the type and the fix
        if token is None:
            raise TypeError("None is not a token: pass the unit of work's key")
        return self._bound.set(_Binding(token))

    def reset(self, handle: contextvars.Token[_Binding | None]) -> None:
        """Restore the token that was current before :meth:`bind`."""
        binding = self._bound.get()
        self._bound.reset(handle)
        if binding is not None:
            binding.live = False  # copies of the context that hold it see it end


class AutoScope(ContextVarScope):
    """The default: one Session per execution context, whatever runs it.

    Unit of isolation: the current :class:`contextvars.Context`, the rule of
    ``"contextvar"``, which is right in every runtime: one per thread, one
    per greenlet (gevent greenlets and raw greenlets start with an empty
    Context), one per asyncio task (each runs in a copy of its creator's
    context), and one per ``asyncio.to_thread`` / ``run_in_executor`` call
    that copies the task's context, so work hopped to an executor thread
    never shares a Session with another task's work, and its Session ends
    with that call. Decided at each use, never at import.

    Tasks made with an explicit shared ``context=`` share that Context's
    Session, as they share its variables. :class:`TaskScope` keys by the
    task instead (what :class:`scoping.asyncio.async_scoped_session` means by
    ``"auto"``).

    Cost, cleanup and fork: as ``"contextvar"``; a task's Session is closed
    when the task ends (done or cancelled) and nothing else holds its
    Context, a ``to_thread`` call's when the call's Context is freed.
    """

    __slots__ = ()
    name = "auto"
    fast_key_kind: FastKeyKind = "context"  # declared here: only a class's own counts


class TaskScope(ContextVarScope):
    """One Session per asyncio task inside a running task, else per execution context.

    Unit of isolation: the running :class:`asyncio.Task`; outside a task
    (threads, greenlets, ``to_thread`` calls), the current
    :class:`contextvars.Context`, as with ``"contextvar"``. This is what
    :class:`scoping.asyncio.async_scoped_session` uses for ``scope="auto"``:
    an AsyncSession belongs to the task (and loop) that made it. Two tasks
    given one shared ``context=`` get a Session each.

    Cost: one C call for the running loop and one for the task, on top of
    ``"contextvar"``'s outside a task. Cleanup: as the task ends (done or
    cancelled, from its done-callback), or as ``"contextvar"``. Fork: the
    child forgets inherited Sessions.
    """

    __slots__ = ()
    name = "task"
    fast_key_kind: FastKeyKind = "exact"

    def __init__(self) -> None:
        super().__init__()
        from asyncio import current_task, events

        get_running_loop = events._get_running_loop
        # ContextVarScope's key closure, read from the slot (a subclass of
        # this class may define current() and call super().current()).
        by_context: t.Callable[[], t.Hashable] = _slot(type(self), "current").__get__(
            self, type(self)
        )

        def current() -> t.Hashable:
            loop = get_running_loop()
            if loop is not None:
                task = current_task(loop)
                if task is not None:
                    return task
            return by_context()

        _install_key_functions(self, current, current)

    def watch(self, key: t.Hashable, on_end: OnEnd) -> bool:
        if isinstance(key, int):
            return super().watch(key, on_end)
        return _units.watch_unit(key, on_end)

    def unwatch(self, key: t.Hashable, on_end: OnEnd) -> bool:
        if isinstance(key, int):
            return False  # a Context: watched by its weak reference
        return _units.unwatch_unit(key, on_end)

    def is_ended(self, key: t.Hashable) -> bool:
        if isinstance(key, int):
            return super().is_ended(key)
        return _units.unit_ended(key)


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
assert tuple(_NAMED) == STRATEGY_NAMES


def fast_key_kind(
    scope: str | ScopeStrategy, scopefunc: t.Callable[[], t.Hashable] | None = None
) -> FastKeyKind:
    """The :data:`FastKeyKind` of the strategy ``strategy_for(scope, scopefunc)`` gives.

    Read from that strategy's own class, never inherited: a subclass that
    redefines ``current()`` without declaring its kind is ``"exact"``. Known
    before the strategy is made (bad arguments give ``"exact"``; building the
    strategy then raises).
    """
    if scopefunc is not None or (isinstance(scope, TokenScope) and scope.scopefunc is not None):
        # A TokenScope over a scopefunc is keyed by the function; reading a
        # binding first would cost it a call on every lookup.
        return "exact"
    named = _NAMED.get(scope) if isinstance(scope, str) else type(scope)
    cls = t.cast("type[t.Any] | None", named)
    kind = vars(cls).get("fast_key_kind", "exact") if cls is not None else "exact"
    return t.cast(FastKeyKind, kind)


def fast_key_rule(
    strategy: ScopeStrategy, kind: FastKeyKind
) -> bool | t.Callable[[t.Any], bool] | None:
    """When is the fast key of ``strategy`` (of key shape ``kind``) the key itself?

    ``True`` always (``"exact"``, ``"token"``, or a strategy that declares
    ``fast_key_is_key = True``), a function of the fast key that says so, or
    None: never known, ``current()`` decides. The hot path's miss (see
    :meth:`scoping.registry.Registry.miss_handler`) makes the Session straight
    from the fast key where this allows.
    """
    if kind in ("exact", "token"):
        return True
    rule = getattr(strategy, "fast_key_is_key", None)
    return rule if rule is True or callable(rule) else None


def strategy_for(
    scope: str | ScopeStrategy, scopefunc: t.Callable[[], t.Hashable] | None = None
) -> ScopeStrategy:
    """Turn the ``scope=`` and ``scopefunc=`` arguments into a strategy object.

    :param scope: one of :data:`STRATEGY_NAMES` or a :class:`ScopeStrategy`.
    :param scopefunc: SQLAlchemy's ``scopefunc``; gives a :class:`TokenScope`
      over it, so only ``scope="auto"`` (the default) or ``"token"`` may go
      with it.
    :raises ValueError: unknown name, or ``scopefunc`` with another strategy.
    :raises TypeError: ``scopefunc`` not callable, or ``scope`` neither a name
      nor an object with ``current()`` (``watch()`` and ``is_ended()`` are
      optional: without them a scope's Session stays until ``remove()``).
    """
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
            valid = ", ".join(repr(n) for n in STRATEGY_NAMES)
            raise ValueError(
                f"unknown scope strategy {scope!r}: use one of {valid}, or pass a strategy object"
            ) from None
        return factory()
    if not callable(getattr(scope, "current", None)):
        raise TypeError(
            f"scope={scope!r} is neither a strategy name nor an object with a current() "
            f"method: subclass scoping.BaseScope and implement current() (see "
            f"scoping.ScopeStrategy)"
        )
    return scope
