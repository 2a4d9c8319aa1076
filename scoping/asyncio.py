"""``scoping.asyncio.async_scoped_session``: one AsyncSession per task, self-cleaning.

It subclasses :class:`sqlalchemy.ext.asyncio.async_scoped_session`, so every
proxy (``add``, ``execute``, ``commit``, ``info``, ...), ``configure`` and
``__call__(**kw)`` are SQLAlchemy's own code, on 2.0 and 2.1 alike::

    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
    from scoping.asyncio import async_scoped_session

    Session = async_scoped_session(async_sessionmaker(engine))   # scope="auto"

    async def handler():
        Session.add(obj)
        await Session.commit()
        # no remove(): the Session is closed on the loop when this task ends

    async with Session.scope() as session:   # or remove it on exit, explicitly
        ...

What differs from SQLAlchemy's class:

- ``scopefunc`` is optional: ``scope=`` picks one of scoping's strategies
  (``"auto"``, the default, keys by the running task; ``"contextvar"`` by the
  task's Context; ``"token"`` by a token bound with ``scope(token)``) or any
  :class:`~scoping.ScopeStrategy` object. ``"thread"`` and ``"greenlet"`` are
  refused: every task of a loop runs in the same thread and greenlet.
- Self-cleaning. When the task that made a Session ends (returns, raises, is
  cancelled) without ``remove()``, its done-callback only *retires* the
  Session (no I/O); a cleanup task on the same loop then closes it with
  ``await session.close()`` (up to 16 at a time), each close bounded by
  ``registry.close_timeout`` seconds (default 10). When the loop shuts down
  through :func:`asyncio.run` (or anything that calls
  ``loop.shutdown_asyncgens()``, as uvicorn does), every Session still made on
  that loop is closed before the loop closes.
- ``remove()`` and ``scope()`` are cancel-safe: the Session leaves the
  registry first, and a close interrupted by cancellation is finished by the
  cleanup task, so the connection always goes back to the pool.
- ``guard=True``: a task that touches a Session it does not own gets
  :class:`~scoping.ScopeViolation` naming both tasks, before the driver sees
  anything.

Lifecycle, per unit of isolation (an asyncio task under ``auto``):

- **Child task** (``asyncio.create_task`` copies the context): under
  ``auto`` and ``contextvar`` it gets its own Session, closed when it ends.
  Under ``token`` it shares the token's Session only while the
  ``scope(token)`` block that bound the token is live; once that block has
  exited, the child is refused with :class:`~scoping.ScopeEnded` instead of
  making a Session that nobody removes.
- **Thread hop** (``asyncio.to_thread``, ``run_in_executor``): there is no
  running loop in the worker thread, and an AsyncSession cannot be used there
  anyway; use a sync :class:`scoping.scoped_session` for the thread's work.
- **Cancel**: measured with ``python -m pytest tests/test_asyncio_cancel.py -v``:
  asyncpg and psycopg 3 both cancel the statement on the server and the
  connection returns to the pool once the Session is closed (see
  docs/asyncio.md).
- **Abandoned task** (destroyed while pending): its done-callback never runs;
  the Session stays until ``remove()``, :meth:`AsyncRegistry.aclose_all` or
  loop shutdown.
- **Fork**: an event loop does not survive ``fork``; the child starts a new
  loop and its registries start empty through :mod:`scoping`'s fork
  mechanism; nothing is sent on inherited connections.

Costs: a proxied call is one key call and one dict lookup (see
docs/benchmarks.md). Each Session creation adds a done-callback to its task
(taken back by ``remove()`` and ``scope()``) and records its loop under a weak
reference; each loop gets one suspended async generator (the shutdown hook)
and at most one cleanup task at a time.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import operator
import sys
import typing as t
import weakref

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.asyncio import async_scoped_session as _sa_async_scoped_session
from sqlalchemy.util import warn

from . import fork
from .errors import NoScopeToken, ScopeReentered
from .guard import SessionGuard
from .registry import Registry
from .scopes import ScopeStrategy, TaskScope, fast_key_kind, fast_key_rule, strategy_for
from .session import check_arguments

if t.TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import async_sessionmaker

__all__ = ["AsyncRegistry", "AsyncScopeBlock", "async_scoped_session"]

_AS = t.TypeVar("_AS", bound=AsyncSession)

log = logging.getLogger("scoping.asyncio")

_REFUSED = {"thread", "greenlet"}

#: Retired Sessions a cleanup task closes at the same time.
CLOSE_BATCH = 16


class _LoopState:
    """What the registry keeps per event loop."""

    __slots__ = ("closing", "hook", "loop", "queue", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)
        self.queue: collections.deque[AsyncSession] = collections.deque()
        self.closing: list[AsyncSession] = []  # the batch being closed now
        self.task: asyncio.Task[None] | None = None
        self.hook: t.Any = None  # the shutdown async generator, held strongly


class _SessionLoops:
    """The event loop that made each Session, forgotten when the Session is freed.

    A dict keyed by weak references whose callback is the dict's own ``pop``:
    forgetting a Session runs no Python frame, where a
    :class:`weakref.WeakKeyDictionary` makes three (about 1 µs a Session).
    A Session is recorded once, so each reference's callback finds its entry.
    """

    __slots__ = ("_by_ref",)

    def __init__(self) -> None:
        self._by_ref: dict[weakref.ref[AsyncSession], asyncio.AbstractEventLoop] = {}

    def record(self, session: AsyncSession, loop: asyncio.AbstractEventLoop) -> bool:
        """Record ``loop`` as ``session``'s, unless it has one; True if recorded now."""
        by_ref = self._by_ref
        if weakref.ref(session) in by_ref:
            return False
        by_ref[weakref.ref(session, by_ref.pop)] = loop
        return True

    def get(
        self, session: AsyncSession, default: asyncio.AbstractEventLoop | None = None
    ) -> asyncio.AbstractEventLoop | None:
        return self._by_ref.get(weakref.ref(session), default)

    def __len__(self) -> int:
        return len(self._by_ref)


async def _until_loop_shutdown(
    registry: weakref.ref[AsyncRegistry[t.Any]], loop: asyncio.AbstractEventLoop
) -> AsyncIterator[None]:
    """Suspended for the loop's whole life; ``loop.shutdown_asyncgens()`` resumes it."""
    try:
        yield
    finally:
        owner = registry()
        if owner is not None:
            await owner._shutdown_loop(loop)


class AsyncRegistry(Registry[_AS]):
    """A :class:`~scoping.Registry` whose retired Sessions are closed on their loop.

    Retiring (a task ended) never does I/O; closing happens in a cleanup task
    on the loop that made the Session, up to :data:`CLOSE_BATCH` at a time,
    each bounded by :attr:`close_timeout`. ``collect()`` and ``close_all()`` (sync) schedule
    those closes; :meth:`acollect` and :meth:`aclose_all` await them.
    """

    __slots__ = (
        "__weakref__",
        "_blocks",
        "_last_loop",
        "_loop_of",
        "_loops",
        "_strategy_unwatch",
        "close_timeout",
        "guarded",
    )

    def __init__(self, createfunc: t.Callable[[], _AS], strategy: ScopeStrategy) -> None:
        super().__init__(createfunc, strategy)
        # Optional (BaseScope has it): takes back a watch once remove() ended the scope.
        self._strategy_unwatch: t.Callable[[t.Hashable, t.Any], bool] | None = getattr(
            strategy, "unwatch", None
        )
        self.close_timeout = 10.0
        """Seconds one ``close()`` may take in the cleanup task before it is abandoned."""
        #: Set by :class:`async_scoped_session` when ``guard=True``: its
        #: Sessions carry a guard to release before they are closed.
        self.guarded = False
        self._loop_of = _SessionLoops()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        # The state of the loop that made the last Session (most programs run
        # one loop): found without a WeakKeyDictionary lookup.
        self._last_loop: _LoopState | None = None
        # key -> number of live scope() blocks for it
        self._blocks: dict[t.Hashable, int] = {}

    # -- creation -------------------------------------------------------------

    # A token inherited from an exited scope() block is refused by
    # TokenScope.current() itself (ScopeEnded), before any Session is made.

    def _create(self, key: t.Hashable) -> _AS:
        session = super()._create(key)
        self._adopt(session)
        return session

    def set(self, obj: _AS) -> None:
        """Set the Session of the current scope."""
        super().set(obj)
        self._adopt(obj)

    def _adopt(self, session: _AS) -> None:
        loop = asyncio.events._get_running_loop()
        if loop is None or not self._loop_of.record(session, loop):
            return
        last = self._last_loop
        if last is not None and last.loop() is loop:
            return
        state = self._loops.get(loop)
        if state is None:
            # (a state _dispatch made for a loop first seen retiring a Session
            # has no hook yet: it gets one here)
            state = self._loops[loop] = _LoopState(loop)
        if state.hook is None:
            hook = t.cast(
                "t.AsyncGenerator[None, None]", _until_loop_shutdown(weakref.ref(self), loop)
            )
            # Start it now, in this thread: the loop's firstiter hook then
            # registers it, and loop.shutdown_asyncgens() resumes it.
            try:
                hook.asend(None).send(None)
            except StopIteration:
                state.hook = hook
        if state.hook is not None:
            self._last_loop = state  # only a loop whose shutdown is hooked

    # -- cleanup: Registry hook points ------------------------------------------

    def _schedule_cleanup(self) -> None:
        self._dispatch()

    def _close_retired(self, raise_errors: bool = False) -> int:
        """Hand retired Sessions to their loops' cleanup tasks; return how many."""
        return self._dispatch()

    def _dispatch(self) -> int:
        # Runs in callbacks of every kind (done-callbacks, weakref callbacks,
        # other threads): it only moves Sessions between queues.
        running = asyncio.events._get_running_loop()
        retired = self._retired
        kept: list[_AS] = []
        moved = 0
        touched: set[asyncio.AbstractEventLoop] = set()
        while retired:
            session = retired.popleft()
            loop = self._loop_of.get(session, running)
            if loop is None:  # made outside any loop, retired outside any loop
                kept.append(session)
                continue
            state = self._loops.get(loop)
            if state is None:
                state = self._loops[loop] = _LoopState(loop)
            state.queue.append(session)
            touched.add(loop)
            moved += 1
        retired.extend(kept)
        for loop in touched:
            if loop is running:
                self._start_cleanup(loop)
            elif loop.is_closed():
                self._abandon(loop)
            else:
                try:
                    loop.call_soon_threadsafe(self._start_cleanup, loop)
                except RuntimeError:  # closed in the meantime
                    self._abandon(loop)
        return moved

    def _abandon(self, loop: asyncio.AbstractEventLoop) -> None:
        state = self._loops.get(loop)
        if state is None or not state.queue:
            return
        log.warning(
            "%d Session(s) retired after their event loop closed cannot be closed; "
            "run the loop with asyncio.run() (which calls loop.shutdown_asyncgens()) "
            "so scoping closes them before the loop ends",
            len(state.queue),
        )
        state.queue.clear()

    def _start_cleanup(self, loop: asyncio.AbstractEventLoop) -> None:
        state = self._loops.get(loop)
        if state is None or not state.queue:
            return
        # A task cancelled before its first step (loop shutdown cancels every
        # task) never ran its finally: a done task counts as none.
        if state.task is None or state.task.done():
            state.task = loop.create_task(self._drain(state), name="scoping-cleanup")

    async def _drain(self, state: _LoopState) -> None:
        """The cleanup task's body (never awaited by anyone else)."""
        task = asyncio.current_task()
        queue = state.queue
        try:
            while queue:
                # Up to CLOSE_BATCH closes at once, each on its own connection:
                # tasks waiting for the pool get connections back at that rate.
                batch = [queue.popleft() for _ in range(min(len(queue), CLOSE_BATCH))]
                state.closing = batch
                closed: t.Set[int] = set()  # noqa: UP006 - `set` is a method here
                try:
                    await asyncio.gather(*(self._aclose(s, closed) for s in batch))
                except asyncio.CancelledError:
                    # The loop is shutting down (asyncio.run cancels every
                    # task): finish the interrupted closes anyway, each is
                    # bounded; the finished ones are not closed twice.
                    uncancel = getattr(task, "uncancel", None)  # Python 3.11+
                    if uncancel is not None:
                        uncancel()
                    rest = [s for s in batch if id(s) not in closed]
                    await asyncio.gather(*(self._aclose(s, closed) for s in rest))
                state.closing = []
        finally:
            state.closing = []
            if state.task is task:
                state.task = None

    async def _aclose(self, session: AsyncSession, closed: t.Set[int]) -> None:  # noqa: UP006 - `set` is a method here
        _release_guard(session)
        try:
            await asyncio.wait_for(session.close(), self.close_timeout)
        except asyncio.TimeoutError:
            log.warning(
                "closing the AsyncSession of an ended scope took more than %s s; abandoned",
                self.close_timeout,
            )
        except Exception:
            log.warning("closing the AsyncSession of an ended scope failed", exc_info=True)
        closed.add(id(session))

    async def _shutdown_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop is closing: close every Session made on it, then return."""
        for _ in range(100):  # a few turns: the reaper thread may be retiring one now
            for key, session in list(self.registry.items()):
                if self._loop_of.get(session) is loop:
                    self._take(key)
                    self._retired.append(session)
            self._dispatch()
            await self._until_drained(loop)
            if not self._left_on(loop):
                return
            await asyncio.sleep(0.001)

    def _left_on(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Does any Session made on ``loop`` still wait to be closed?"""
        state = self._loops.get(loop)
        return bool(
            (state is not None and state.queue)
            or any(self._loop_of.get(s) is loop for s in list(self._retired))
            or any(self._loop_of.get(s) is loop for s in list(self.registry.values()))
        )

    def _take(self, key: t.Hashable) -> _AS | None:
        # A task whose Session is removed (remove(), a scope() block's end)
        # needs no done-callback any more: where the strategy can take it back
        # (BaseScope.unwatch), the key is forgotten and watched again if the
        # task makes another Session. Registry._discard also forgets a polled
        # key's watch entry.
        unwatch = self._strategy_unwatch
        if unwatch is not None and self._watched.get(key) is True and unwatch(key, self._on_end):
            del self._watched[key]
        return self._discard(key)

    def _forget_inherited(self) -> list[t.Any]:
        """In a forked child: drop every inherited Session and loop without touching them."""
        kept = super()._forget_inherited()
        for state in list(self._loops.values()):
            kept.extend(state.queue)
            kept.append(state.hook)  # never finalized here: it would run on no loop
        self._loops = weakref.WeakKeyDictionary()
        self._loop_of = _SessionLoops()
        self._last_loop = None
        self._blocks.clear()
        return kept

    def retire(self, session: _AS) -> None:
        """Queue ``session`` for closing on its loop (no I/O here)."""
        self._retired.append(session)
        self._dispatch()

    # -- awaited variants ---------------------------------------------------------

    async def acollect(self) -> int:
        """Retire ended scopes and await the closing of every retired Session.

        Returns how many Sessions of this loop were closed.
        """
        self._sweep()
        self._dispatch()
        return await self._await_loop_queue()

    async def aclose_all(self) -> int:
        """Close every Session of every scope made on this loop and empty the registry."""
        loop = asyncio.get_running_loop()
        for key, session in list(self.registry.items()):
            if self._loop_of.get(session, loop) is loop:
                self._take(key)
                self._retired.append(session)
        self._dispatch()
        return await self._await_loop_queue()

    async def _await_loop_queue(self) -> int:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        count = 0 if state is None else len(state.queue)
        await self._until_drained(loop)
        return count

    async def _until_drained(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until the loop's cleanup task has closed everything queued.

        The closing is done by the cleanup task only: cancelling the caller
        stops the wait, never a close.
        """
        state = self._loops.get(loop)
        while state is not None:
            self._start_cleanup(loop)
            task = state.task
            if task is None or task.done():
                if not state.queue:
                    return
                continue  # a new cleanup task starts on the next turn
            await asyncio.wait([task])

    def pending(self) -> int:
        """Sessions retired but not closed yet, those being closed included (all loops)."""
        states = list(self._loops.values())
        return len(self._retired) + sum(len(s.queue) + len(s.closing) for s in states)


class async_scoped_session(_sa_async_scoped_session[_AS]):
    """SQLAlchemy's ``async_scoped_session``, keyed by a scoping strategy.

    :param session_factory: an :class:`~sqlalchemy.ext.asyncio.async_sessionmaker`
        (any callable returning an AsyncSession).
    :param scopefunc: SQLAlchemy's parameter, now optional: a function that
        returns the scope key gives a token strategy over it, so
        ``async_scoped_session(factory, scopefunc=current_task)`` keeps working
        and becomes self-cleaning.
    :param scope: ``"auto"`` (one Session per running task, the default),
        ``"contextvar"``, ``"token"``, or a :class:`~scoping.ScopeStrategy`.
    :param guard: ``True`` makes a Session raise :class:`~scoping.ScopeViolation`
        when it is used from a task that does not own it.

    See the module documentation for cleanup, cancellation and lifecycle.
    """

    registry: AsyncRegistry[_AS]
    strategy: ScopeStrategy

    def __init__(
        self,
        session_factory: async_sessionmaker[_AS],
        scopefunc: t.Callable[[], t.Any] | None = None,
        *,
        scope: str | ScopeStrategy = "auto",
        guard: bool = False,
    ) -> None:
        check_arguments(session_factory, guard, "sqlalchemy.ext.asyncio.async_sessionmaker(engine)")
        if isinstance(scope, str) and scope in _REFUSED and scopefunc is None:
            raise ValueError(
                f"scope={scope!r} gives every task of an event loop the same AsyncSession "
                f"(they all run in one thread and one greenlet): use scope='auto' (one "
                f"Session per task), 'contextvar' or 'token'"
            )
        self.session_factory = session_factory
        # "auto" means the task here: an AsyncSession is closed on its task's loop.
        self.strategy = (
            TaskScope() if scope == "auto" and scopefunc is None else strategy_for(scope, scopefunc)
        )
        self.guard = guard
        createfunc: t.Callable[[], _AS] = session_factory
        if guard:
            createfunc = self._create_guarded
        self.registry = AsyncRegistry(createfunc, self.strategy)
        self.registry.guarded = guard
        # Bound once: the hot path is one key call and one dict lookup. The
        # key call is the strategy's fast key when it declares one; for a
        # strategy that keys by the running task first (TaskScope, "auto"), it is
        # asyncio.current_task itself, which is that key inside a task and
        # misses (None, or RuntimeError outside a loop) everywhere else, so
        # the registry asks the strategy. tests/test_asyncio.py holds both
        # equal to strategy.current() inside tasks.
        self._sessions = self.registry.registry
        self._current = _fast_key(self.strategy)
        # A miss makes the Session from the key already computed where that
        # key is current()'s (scopes.fast_key_rule), else asks the registry.
        # asyncio.current_task() (TaskScope's fast key here) is the key
        # unless it is None: no task is running.
        rule = (
            functools.partial(operator.is_not, None)
            if type(self.strategy) is TaskScope
            else fast_key_rule(self.strategy, fast_key_kind(self.strategy))
        )
        self._miss: t.Callable[[t.Hashable], _AS] = self.registry.miss_handler(rule)
        fork._track_owner(self)  # a forked child gives the bound engines new pools

    def dispose_engines(self) -> None:
        """Give every engine the session factory binds a new pool (for a forked child).

        The engines' ``sync_engine`` (``bind=`` and ``binds=``); see
        :func:`scoping.fork.dispose_engines`: nothing is sent on the old
        connections, which belong to the parent's loop. Done automatically in
        every child made by ``os.fork()``.
        """
        fork.dispose_engines(*self._bound_engines())

    def _bound_engines(self) -> list[Engine]:
        from sqlalchemy.engine import Connection, Engine
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

        kw = getattr(self.session_factory, "kw", {})
        engines: list[Engine] = []
        for bind in [kw.get("bind"), *dict(kw.get("binds") or {}).values()]:
            if isinstance(bind, (AsyncEngine, AsyncConnection)):
                bind = bind.sync_engine
            if isinstance(bind, Connection):
                bind = bind.engine
            if isinstance(bind, Engine) and all(bind is not e for e in engines):
                engines.append(bind)
        return engines

    @property
    def _proxied(self) -> _AS:
        try:
            key = self._current()
        except RuntimeError:  # asyncio.current_task() outside a running loop
            return self.registry()
        try:
            return self._sessions[key]
        except KeyError:
            return self._miss(key)
        except TypeError:
            return self.registry()  # raises the unhashable-key error

    def __call__(self, **kw: t.Any) -> _AS:
        if kw:
            session = super().__call__(**kw)
            if self.guard:
                SessionGuard.install(session.sync_session, self.strategy)
            return session
        # _proxied's statements, written again on purpose: returning
        # self._proxied would cost every Session() one more Python call.
        try:
            key = self._current()
        except RuntimeError:  # asyncio.current_task() outside a running loop
            return self.registry()
        try:
            return self._sessions[key]
        except KeyError:
            return self._miss(key)
        except TypeError:
            return self.registry()  # raises the unhashable-key error

    def _create_guarded(self) -> _AS:
        session = self.session_factory()
        SessionGuard.install(session.sync_session, self.strategy)
        return session

    def configure(self, **kwargs: t.Any) -> None:
        """Reconfigure the ``async_sessionmaker``; warns if any scope holds a Session."""
        if len(self.registry):
            warn(
                "At least one scoped session is already present. "
                " configure() can not affect sessions that have "
                "already been created."
            )
        self.session_factory.configure(**kwargs)

    async def remove(self) -> None:
        """Close the current scope's AsyncSession, if any, and forget it.

        The Session leaves the registry before ``close()`` is awaited; if the
        close is cancelled or fails, the registry's cleanup task closes it on
        this loop, and the error propagates.
        """
        registry = self.registry
        try:
            key = self.strategy.current()
        except NoScopeToken:
            return  # no scope is current, so nothing is present in it
        session = registry._take(key)
        if session is not None:
            await _close_or_retire(registry, session)

    def scope(self, token: t.Hashable | None = None) -> AsyncScopeBlock[_AS]:
        """``async with Session.scope() as session:``; the Session is removed on exit.

        Nested blocks of the same scope share the Session; the outermost
        removes it. With the token strategy, ``token`` is bound for the block
        (tasks created inside inherit it while the block is live). A block
        object may be entered once.
        """
        if token is not None and getattr(self.strategy, "bind", None) is None:
            raise TypeError(
                f"the {self.strategy.name!r} strategy takes no token: call Session.scope() "
                f"without arguments, or use scope='token' to key Sessions by token"
            )
        return AsyncScopeBlock(self, token)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__module__}.{type(self).__name__} strategy={self.strategy.name!r} "
            f"live={len(self.registry)}>"
        )


def _fast_key(strategy: ScopeStrategy) -> t.Callable[[], t.Hashable]:
    """The cheapest callable that returns ``strategy.current()`` inside a task, or misses."""
    if type(strategy) is TaskScope:
        return asyncio.current_task
    return t.cast("t.Callable[[], t.Hashable]", getattr(strategy, "fast_key", strategy.current))


def _release_guard(session: AsyncSession) -> None:
    guard = sys.modules.get("scoping.guard")
    if guard is not None:
        guard.SessionGuard.release(session.sync_session)


async def _close_or_retire(registry: AsyncRegistry[_AS], session: _AS) -> None:
    if registry.guarded:
        _release_guard(session)
    try:
        await session.close()
    except BaseException:
        # Cancelled (or failed) mid-close: the cleanup task finishes the job.
        registry.retire(session)
        raise


_UNSET: t.Final = object()


class AsyncScopeBlock(t.Generic[_AS]):
    """The async context manager returned by :meth:`async_scoped_session.scope`."""

    __slots__ = ("_handle", "_key", "_owner", "_token")

    def __init__(self, owner: async_scoped_session[_AS], token: t.Hashable | None) -> None:
        self._owner = owner
        self._token = token
        self._handle: t.Any = None
        self._key: t.Any = _UNSET

    async def __aenter__(self) -> _AS:
        if self._key is not _UNSET:
            raise ScopeReentered(
                "this Session.scope() block was already entered: call Session.scope() "
                "again for each `async with` (nested blocks share the Session anyway)"
            )
        owner = self._owner
        strategy = owner.strategy
        blocks = owner.registry._blocks
        if self._token is not None:
            self._handle = strategy.bind(self._token)  # type: ignore[attr-defined]
        try:
            key = self._key = strategy.current()
            blocks[key] = blocks.get(key, 0) + 1
            try:
                return owner()
            except BaseException:
                self._leave(key)
                raise
        except BaseException:
            self._reset()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            session = self._leave(self._key)
            if session is not None:
                await _close_or_retire(self._owner.registry, session)
        finally:
            self._reset()

    def _leave(self, key: t.Hashable) -> _AS | None:
        registry = self._owner.registry
        depth = registry._blocks[key] - 1
        if depth:
            registry._blocks[key] = depth
            return None
        del registry._blocks[key]
        # Out of the registry before any await: a task entering the same
        # token now gets a fresh Session, not the one being closed.
        return registry._take(key)

    def _reset(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._owner.strategy.reset(handle)  # type: ignore[attr-defined]
