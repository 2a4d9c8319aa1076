"""``scoping.scoped_session``: SQLAlchemy's ``scoped_session`` with a strategy.

It subclasses :class:`sqlalchemy.orm.scoped_session`, so every proxy method
and attribute, ``query_property``, ``configure`` and ``__call__(**kw)`` are
SQLAlchemy's own code, on 2.0 and 2.1 alike. What changes:

- the registry is a :class:`~scoping.Registry` fed by a scope strategy
  (``scope=``), which cleans up after scopes that end without ``remove()``;
- ``remove()`` clears the scope even when ``close()`` raises (SQLAlchemy's
  leaves the Session behind);
- :meth:`scoped_session.scope` is a context manager that removes the scope's
  Session on exit, and binds a token for the token strategy;
- proxied calls skip one Python call level, so they cost less than
  SQLAlchemy's thread-local proxy.
"""

from __future__ import annotations

import threading
import typing as t

from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session as _sa_scoped_session
from sqlalchemy.util import warn

from .guard import SessionGuard
from .registry import Registry
from .scopes import AutoScope, ContextVarScope, ScopeStrategy, strategy_for

if t.TYPE_CHECKING:
    from sqlalchemy.orm import sessionmaker

__all__ = ["scoped_session"]

_S = t.TypeVar("_S", bound=Session)


class scoped_session(_sa_scoped_session[_S]):
    """SQLAlchemy's ``scoped_session``, keyed by a pluggable scope strategy.

    ``scope`` is ``"thread"``, ``"greenlet"``, ``"contextvar"``, ``"token"``,
    ``"auto"`` (the default) or a :class:`~scoping.ScopeStrategy` object.
    Passing SQLAlchemy's ``scopefunc`` gives a token strategy over that
    function, so existing code moves over unchanged. ``guard=True`` makes a
    Session raise :class:`~scoping.ScopeViolation` when used from a scope
    that does not own it.
    """

    registry: Registry[_S]
    strategy: ScopeStrategy

    def __init__(
        self,
        session_factory: sessionmaker[_S],
        scopefunc: t.Callable[[], t.Any] | None = None,
        *,
        scope: str | ScopeStrategy = "auto",
        guard: bool = False,
    ) -> None:
        self.session_factory = session_factory
        self.strategy = strategy_for(scope, scopefunc)
        self.guard = guard
        createfunc: t.Callable[[], _S] = session_factory
        if guard:
            createfunc = self._create_guarded
        self.registry = Registry(createfunc, self.strategy)
        # Bound once here so that the hot path below is one C-level dict
        # lookup plus one strategy call.
        self._sessions = self.registry.registry
        self._current = self.registry.scopefunc
        # Two strategies are inlined into the hot paths below, so that a hit
        # makes no Python call besides the property itself (only for exactly
        # these classes: a subclass may redefine current()):
        # - ContextVarScope: the key is the id of the running Context.
        #   gr_context is None until the greenlet has a Context; id(None) is
        #   never a key, so that case misses and goes through the strategy,
        #   which makes the Context.
        # - AutoScope: outside a running asyncio loop the key is the current
        #   greenlet; with a loop running, the strategy decides.
        self._inline_getcurrent: t.Callable[[], t.Any] | None = None
        self._inline_running_loop: t.Callable[[], t.Any] | None = None
        if type(self.strategy) in (ContextVarScope, AutoScope):
            try:
                from greenlet import getcurrent
            except ImportError:  # pragma: no cover - greenlet is a dependency
                pass  # AutoScope then keys by thread: not inlined
            else:
                self._inline_getcurrent = getcurrent
                if type(self.strategy) is AutoScope:
                    from asyncio import events

                    self._inline_running_loop = events._get_running_loop
        self._depth: dict[t.Hashable, int] = {}
        self._depth_lock: t.Any = None  # made on first scope(), never at import

    @property
    def _proxied(self) -> _S:
        try:
            getcurrent = self._inline_getcurrent
            if getcurrent is None:
                return self._sessions[self._current()]
            running_loop = self._inline_running_loop
            if running_loop is None:  # contextvar
                return self._sessions[id(getcurrent().gr_context)]
            if running_loop() is None:  # auto, outside asyncio
                return self._sessions[getcurrent()]
            return self._sessions[self._current()]
        except (KeyError, TypeError):
            return self.registry()

    def __call__(self, **kw: t.Any) -> _S:
        if kw:
            session = super().__call__(**kw)
            if self.guard:
                SessionGuard.install(session, self.strategy)
            return session
        # The body of _proxied, repeated on purpose: Session() is called once
        # or more per request, and a property call here costs 15-20 %.
        try:
            getcurrent = self._inline_getcurrent
            if getcurrent is None:
                session = self._sessions[self._current()]
            elif self._inline_running_loop is None:  # contextvar
                session = self._sessions[id(getcurrent().gr_context)]
            elif self._inline_running_loop() is None:  # auto, outside asyncio
                session = self._sessions[getcurrent()]
            else:
                session = self._sessions[self._current()]
        except (KeyError, TypeError):
            session = self.registry()
        if session._is_asyncio:
            return super().__call__()  # SQLAlchemy's own deprecation warning
        return session

    def _create_guarded(self) -> _S:
        session = self.session_factory()
        SessionGuard.install(session, self.strategy)
        return session

    def configure(self, **kwargs: t.Any) -> None:
        """Reconfigure the ``sessionmaker``; warns if any scope holds a Session.

        Unlike SQLAlchemy's, it looks at every scope, not only the current
        one, so it also works outside any ``scope(token)`` block.
        """
        if len(self.registry):
            warn(
                "At least one scoped session is already present. "
                " configure() can not affect sessions that have "
                "already been created."
            )
        self.session_factory.configure(**kwargs)

    def remove(self) -> None:
        """Close the current scope's Session, if any, and forget it.

        The scope is cleared even when ``close()`` raises (including
        ``gevent.Timeout`` and ``GreenletExit``); the error then propagates.
        """
        session = self.registry.pop_current()
        if session is not None:
            session.close()

    def scope(self, token: t.Hashable | None = None) -> ScopeBlock[_S]:
        """Run a unit of work in a scope; its Session is removed on exit.

        ``with Session.scope() as session:`` hands out the scope's Session. On
        exit, normal or by any exception (``gevent.Timeout``, a kill), it is
        closed and forgotten. Nested blocks for the same scope share the
        Session, and only the outermost one removes it.

        With the token strategy, ``token`` is bound for the block (nesting
        restores the outer token) and greenlets that enter the same token
        share its Session until the last of them exits. Other strategies take
        no token.
        """
        if token is not None and getattr(self.strategy, "bind", None) is None:
            raise TypeError(
                f"the {self.strategy.name!r} strategy takes no token: call Session.scope() "
                f"without arguments, or use scope='token' to key Sessions by token"
            )
        return ScopeBlock(self, token)

    def _lock(self) -> t.Any:
        lock = self._depth_lock
        if lock is None:
            # Resolved at first use: after patch_all() this is gevent's lock.
            lock = self._depth_lock = threading.Lock()
        return lock

    def _enter(self, key: t.Hashable) -> None:
        with self._depth_lock or self._lock():
            self._depth[key] = self._depth.get(key, 0) + 1

    def _exit(self, key: t.Hashable) -> None:
        session = None
        with self._depth_lock or self._lock():
            depth = self._depth[key] - 1
            if depth:
                self._depth[key] = depth
            else:
                del self._depth[key]
                # Taken out under the lock so that a greenlet entering the same
                # token now gets a fresh Session, not one being closed.
                session = self.registry.discard(key)
        if session is not None:
            session.close()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__module__}.{type(self).__name__} strategy={self.strategy.name!r} "
            f"live={len(self.registry)}>"
        )


class ScopeBlock(t.Generic[_S]):
    """The context manager returned by :meth:`scoped_session.scope`.

    A class rather than a generator: entering and leaving cost two method
    calls, which matters when every request enters one.
    """

    __slots__ = ("_handle", "_key", "_owner", "_token")

    def __init__(self, owner: scoped_session[_S], token: t.Hashable | None) -> None:
        self._owner = owner
        self._token = token
        self._handle: t.Any = None
        self._key: t.Hashable = None

    def __enter__(self) -> _S:
        owner = self._owner
        strategy = owner.strategy
        if self._token is not None:
            self._handle = strategy.bind(self._token)  # type: ignore[attr-defined]
        try:
            key = self._key = strategy.current()
            owner._enter(key)
            try:
                return owner()
            except BaseException:
                owner._exit(key)
                raise
        except BaseException:
            self._reset()
            raise

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._owner._exit(self._key)
        finally:
            self._reset()

    def _reset(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._owner.strategy.reset(handle)  # type: ignore[attr-defined]
