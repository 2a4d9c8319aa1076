"""``scoping.scoped_session``: SQLAlchemy's ``scoped_session`` with a strategy.

It subclasses :class:`sqlalchemy.orm.scoped_session`, so ``query_property``,
``configure`` and ``__call__(**kw)`` are SQLAlchemy's own code, and every
proxy method and attribute has SQLAlchemy's signature and docstring and
forwards as SQLAlchemy's does, on 2.0 and 2.1 alike. What changes:

- the registry is a :class:`~scoping.Registry` fed by a scope strategy
  (``scope=``), which cleans up after scopes that end without ``remove()``;
- ``remove()`` clears the scope even when ``close()`` raises (SQLAlchemy's
  leaves the Session behind);
- :meth:`scoped_session.scope` is a context manager that removes the scope's
  Session on exit, and binds a token for the token strategy;
- in a child made by ``os.fork()`` inherited Sessions are forgotten, never
  touched, and the bound engines get fresh pools (:mod:`scoping.fork`);
- every proxy runs the key lookup in its own body (:mod:`scoping._hot_path`
  generates them from SQLAlchemy's): one Python call per proxied use (two
  where the key is a function to call, such as a ``scopefunc``), where
  SQLAlchemy's makes three. What that costs against SQLAlchemy's thread-local
  proxy is measured by ``python -m stress.bench --only proxy`` (see
  docs/benchmarks.md).
"""

from __future__ import annotations

import threading
import typing as t
import weakref

from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session as _sa_scoped_session
from sqlalchemy.util import warn

from . import _hot_path, _units, fork
from .errors import ScopeReentered
from .guard import SessionGuard
from .registry import Registry
from .scopes import ScopeStrategy, fast_key_kind, fast_key_rule, strategy_for

if t.TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import sessionmaker

__all__ = ["ScopeBlock", "scoped_session"]

_S = t.TypeVar("_S", bound=Session)


class scoped_session(_sa_scoped_session[_S]):
    """SQLAlchemy's ``scoped_session``, keyed by a pluggable scope strategy.

    Unit of isolation: the strategy's scope. Costs: a proxied call is one
    strategy lookup and one dict lookup (``python -m stress.bench --only
    proxy``); creating a Session also watches its scope's end. Lifecycle:

    - *scope ends* without ``remove()`` (thread exits, greenlet or task
      finishes, is killed or cancelled): its Session is closed by the
      registry's cleanup (docs/cleanup.md gives the bounds);
    - *abandoned unit* (a suspended greenlet nobody references): let go and
      cleaned up like an ended one;
    - *fork*: the child forgets inherited Sessions without touching them and
      replaces the pools of the bound engines (:meth:`dispose_engines`);
    - *thread hop* (``asyncio.to_thread``): under ``"auto"`` or
      ``"contextvar"`` the call gets its own Session, closed when the call's
      Context is freed; under ``"thread"``/``"greenlet"`` it shares the
      executor thread's Session;
    - *copied context* (``create_task``, ``gr_context = copy_context()``):
      ``"contextvar"`` gives the child its own Session; with ``"token"`` the
      child shares its parent's token only while the parent's block is live.
    """

    registry: Registry[_S]
    strategy: ScopeStrategy

    def __new__(
        cls,
        session_factory: t.Any = None,
        scopefunc: t.Callable[[], t.Any] | None = None,
        *,
        scope: str | ScopeStrategy = "auto",
        guard: bool = False,
    ) -> scoped_session[_S]:
        # The class whose proxies run the strategy's key lookup inline
        # (scoping._hot_path), chosen before the instance exists.
        if session_factory is None and "_hot_path_kind" in vars(cls):
            return super().__new__(cls)  # copy/pickle: cls.__new__(cls), then the state
        made = _hot_path.hot_path_class(cls, fast_key_kind(scope, scopefunc), scoped_session)
        instance = super().__new__(made or cls)
        if not isinstance(instance, cls):
            # cls was generated for another key shape (type(Session)(...)):
            # Python runs __init__ only on instances of cls, so it runs here.
            type(instance).__init__(instance, session_factory, scopefunc, scope=scope, guard=guard)
        return instance

    def __init__(
        self,
        session_factory: sessionmaker[_S],
        scopefunc: t.Callable[[], t.Any] | None = None,
        *,
        scope: str | ScopeStrategy = "auto",
        guard: bool = False,
    ) -> None:
        """Build the proxy; nothing is bound to a thread, greenlet or loop yet.

        :param session_factory: a :class:`sqlalchemy.orm.sessionmaker` (any
          callable returning a Session); refused at once when not callable.
        :param scopefunc: SQLAlchemy's ``scopefunc``. It gives a token strategy
          over that function (only with ``scope="auto"`` or ``"token"``), so
          existing code moves over unchanged. It must return a hashable key for
          every unit of work; ``None`` raises :class:`~scoping.NoScopeToken`.
        :param scope: ``"thread"``, ``"greenlet"``, ``"contextvar"``,
          ``"token"``, ``"auto"`` (the default; the names are
          :data:`scoping.scopes.STRATEGY_NAMES`) or a
          :class:`~scoping.ScopeStrategy` object. The strategy defines the unit
          of isolation: see :mod:`scoping.scopes` for the table.
        :param guard: ``True`` makes every Session raise
          :class:`~scoping.ScopeViolation` when used from a scope that does not
          own it (:mod:`scoping.guard`). Must be a bool.

        :raises TypeError: ``session_factory`` or ``scopefunc`` not callable,
          ``guard`` not a bool, ``scope`` not a name nor a strategy.
        :raises ValueError: unknown strategy name, or ``scopefunc`` with a
          strategy other than ``"auto"``/``"token"``.
        """
        check_arguments(session_factory, guard, "sqlalchemy.orm.sessionmaker(bind=engine)")
        strategy = strategy_for(scope, scopefunc)
        kind = fast_key_kind(strategy)
        if getattr(type(self), "_hot_path_kind", kind) != kind:
            # A subclass's own __init__ chose the strategy (scope= fixed there),
            # which __new__ could not see: take that key shape's class, before
            # any attribute is set (the instance dict then has its layout).
            made = _hot_path.hot_path_class(type(self), kind, scoped_session)
            self.__class__ = t.cast("type[scoped_session[_S]]", made)  # never None here
        self.session_factory = session_factory
        self.strategy = strategy
        self.guard = guard
        createfunc: t.Callable[[], _S] = session_factory
        if guard:
            createfunc = self._create_guarded
        self.registry = Registry(createfunc, self.strategy)
        # Bound once here so that the hot path below is one C-level dict
        # lookup plus the strategy's key.
        self._sessions = self.registry.registry
        self._current = self.strategy.current
        # Each strategy declares its hot-path key (scopes.FastKeyKind), on its
        # own class only: a subclass that redefines current() falls back to
        # calling it ("exact"). "exact" and "fast" keys are called through
        # self._fast; the "greenlet" and "context" shapes are written inline.
        # Either way the lookup runs inside every proxy of the subclass that
        # scoping._hot_path generates, so a hit makes no Python call besides
        # the proxy itself. That subclass is picked in __new__, before the
        # instance exists: swapping __class__ afterwards would leave the
        # attribute layout of the first class, and every self._sessions read
        # slower.
        declared = vars(type(self.strategy))
        self._fast: t.Callable[[], t.Hashable] = (
            self.strategy.fast_key if "fast_key" in declared else self._current  # type: ignore[attr-defined]
        )
        # The "token" shape's binding reader (scopes.TokenScope.read_binding).
        self._read_binding: t.Callable[[], t.Any] | None = getattr(
            self.strategy, "read_binding", None
        )
        # A miss makes the Session straight from the fast key where the
        # strategy says that key is the key (scopes.fast_key_rule); else
        # current() decides.
        self._miss: t.Callable[[t.Hashable], _S] = self.registry.miss_handler(
            fast_key_rule(self.strategy, kind)
        )
        # Live scope() blocks per key. Greenlet and task keys are held weakly:
        # a block suspended in an abandoned raw greenlet must not keep that
        # greenlet alive, or the registry could never let it go (and its
        # finally blocks would never run).
        self._depth: dict[t.Hashable, int] = {}
        self._unit_depth: weakref.WeakKeyDictionary[t.Any, int] = weakref.WeakKeyDictionary()
        self._depth_lock: t.Any = None  # made on first scope(), never at import
        fork._track_owner(self)

    @property
    def _proxied(self) -> _S:
        # The generic lookup (scoping._hot_path.lookup_source("exact") is the
        # same statements, run inline by the generated proxies).
        key = self._fast()  # outside the try: a scopefunc's KeyError propagates
        try:
            return self._sessions[key]
        except KeyError:
            return self._miss(key)
        except TypeError:
            return self.registry()  # raises the unhashable-key error

    def __call__(self, **kw: t.Any) -> _S:
        if kw:
            session = super().__call__(**kw)
            if self.guard:
                SessionGuard.install(session, self.strategy)
            return session
        # Runs only where a subclass defines _proxied or __call__ itself:
        # everywhere else scoping._hot_path's generated __call__ does.
        session = self._proxied
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
        session = self.registry._pop_current()
        if session is not None:
            session.close()

    def dispose_engines(self) -> None:
        """Give every engine the session factory binds a new pool (for a forked child).

        Covers ``bind=`` and every engine in ``binds=``; see
        :func:`scoping.fork.dispose_engines`, which this calls: the old pools
        and their connections are kept untouched, nothing is sent on them.
        Done automatically in every child made by ``os.fork()``; call it
        yourself only if you replaced the factory's binds after the fork.
        """
        fork.dispose_engines(*self._bound_engines())

    def _bound_engines(self) -> list[Engine]:
        from sqlalchemy.engine import Connection, Engine

        kw = getattr(self.session_factory, "kw", {})
        candidates = [kw.get("bind"), *dict(kw.get("binds") or {}).values()]
        engines: list[Engine] = []
        for bind in candidates:
            if isinstance(bind, Connection):
                bind = bind.engine
            if isinstance(bind, Engine) and all(bind is not e for e in engines):
                engines.append(bind)
        return engines

    def scope(self, token: t.Hashable | None = None) -> ScopeBlock[_S]:
        """Run a unit of work in a scope; its Session is removed on exit.

        :param token: for the token strategy, the key to bind for the block
          (nesting restores the outer token); other strategies take none.

        ``with Session.scope() as session:`` hands out the scope's Session. On
        exit, normal or by any exception (``gevent.Timeout``, a kill, a
        cancel), it is closed and forgotten. Nested blocks for the same scope
        share the Session, and only the outermost one removes it. Greenlets
        that enter the same token share its Session until the last of them
        exits. A task or greenlet that copied the block's context and
        outlives it cannot make a Session for the token any more
        (:class:`~scoping.ScopeEnded`). Each ``with`` needs its own
        ``scope()`` call: entering one object twice raises
        :class:`~scoping.ScopeReentered`.
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

    def _enter(self, key: t.Hashable, depths: t.MutableMapping[t.Any, int]) -> _S:
        """Count a block into scope ``key`` (``depths``: _depth, or _unit_depth for a unit)."""
        with self._depth_lock or self._lock():
            depths[key] = depths.get(key, 0) + 1
        try:
            session = self._sessions.get(key)
            if session is None:
                session = self.registry._create(key)  # key is the strategy's current()
            if session._is_asyncio:
                return self()  # SQLAlchemy's own deprecation warning
            return session
        except BaseException:
            self._exit(key, depths)
            raise

    def _exit(self, key: t.Hashable, depths: t.MutableMapping[t.Any, int]) -> None:
        session = None
        with self._depth_lock or self._lock():
            depth = depths[key] - 1
            if depth:
                depths[key] = depth
            else:
                del depths[key]
                # Taken out under the lock so that a greenlet entering the same
                # token now gets a fresh Session, not one being closed.
                session = self.registry._discard(key)
        if session is not None:
            session.close()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__module__}.{type(self).__name__} strategy={self.strategy.name!r} "
            f"live={len(self.registry)}>"
        )


def check_arguments(session_factory: object, guard: object, factory_hint: str) -> None:
    """Refuse, up front, the arguments every scoped_session class refuses.

    :param factory_hint: what to pass instead, named in the error.
    :raises TypeError: ``session_factory`` is not callable, or ``guard`` is not a bool.
    """
    if not callable(session_factory):
        raise TypeError(f"session_factory={session_factory!r} is not callable: pass {factory_hint}")
    if not isinstance(guard, bool):
        raise TypeError(
            f"guard= must be True or False, got {guard!r}: guard=True turns the "
            f"concurrency guard on"
        )


def check_removable(sessions: tuple[object, ...], kinds: str) -> None:
    """Refuse a request middleware's arguments unless each is a scoped session.

    :param kinds: the classes to name in the error (``"scoped_session"``, ...).
    :raises TypeError: no session given, or one without ``remove()`` (a Session
      instance passed where its scoped_session belongs).
    """
    if not sessions:
        raise TypeError(
            f"SessionMiddleware(app, *sessions) needs at least one scoped session: pass "
            f"the {kinds} objects to remove after each request"
        )
    for session in sessions:
        if not callable(getattr(session, "remove", None)):
            raise TypeError(
                f"{session!r} has no remove() method: pass the scoped session "
                "(Session), not a Session instance (Session())"
            )


_IDLE: t.Final = object()


class _UnitRef(weakref.ref):  # type: ignore[type-arg]
    """A :class:`ScopeBlock`'s weak reference to its unit key.

    Its own type, so that a token which is itself a :class:`weakref.ref`
    (hashable when its referent is) is never mistaken for one.
    """

    __slots__ = ()


class ScopeBlock(t.Generic[_S]):
    """The context manager returned by :meth:`scoped_session.scope`.

    A class rather than a generator: entering and leaving cost two method
    calls, which matters when every request enters one. One object is one
    block: entering it again before it exits raises
    :class:`~scoping.ScopeReentered`.
    """

    __slots__ = ("_handle", "_key", "_owner", "_token")

    def __init__(self, owner: scoped_session[_S], token: t.Hashable | None) -> None:
        self._owner = owner
        self._token = token
        self._handle: t.Any = None
        self._key: t.Hashable = _IDLE

    def __enter__(self) -> _S:
        if self._key is not _IDLE:
            raise ScopeReentered(
                "this Session.scope() object is already entered (by this or another "
                "greenlet, thread or task): call Session.scope() again for each `with` "
                "block; nested blocks for the same scope share the Session anyway"
            )
        owner = self._owner
        strategy = owner.strategy
        if self._token is not None:
            self._handle = strategy.bind(self._token)  # type: ignore[attr-defined]
        try:
            key = strategy.current()
            # A unit key is held weakly (see scoped_session._unit_depth): the
            # block lives in the unit's own frame, so a strong reference would
            # make a cycle that keeps an abandoned greenlet alive forever.
            if _units.is_unit(key):
                self._key = _UnitRef(key)
                return owner._enter(key, owner._unit_depth)
            self._key = key
            return owner._enter(key, owner._depth)
        except BaseException:
            self._key = _IDLE
            handle, self._handle = self._handle, None
            if handle is not None:
                strategy.reset(handle)  # type: ignore[attr-defined]
            raise

    def __exit__(self, *exc_info: object) -> None:
        key, self._key = self._key, _IDLE
        try:
            if type(key) is _UnitRef:
                key = key()
                if key is None:  # the unit is gone: its Session was retired with it
                    return
                self._owner._exit(key, self._owner._unit_depth)
            else:
                self._owner._exit(key, self._owner._depth)
        finally:
            handle, self._handle = self._handle, None
            if handle is not None:
                self._owner.strategy.reset(handle)  # type: ignore[attr-defined]
