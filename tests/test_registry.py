"""The Registry contract, the scope() context manager and the errors users see."""

from __future__ import annotations

import threading
import typing as t
import uuid
import warnings
import weakref

import greenlet
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.util import ScopedRegistry

import scoping
from scoping.registry import Registry

STRATEGIES = ["thread", "greenlet", "contextvar", "token", "auto"]


@pytest.fixture
def factory() -> t.Iterator[sessionmaker[Session]]:
    engine = create_engine("sqlite://")
    yield sessionmaker(bind=engine)
    engine.dispose()


def in_scope(S: scoping.scoped_session[Session], token: str = "t") -> t.ContextManager[Session]:
    return S.scope(token) if S.strategy.name == "token" else S.scope()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_registry_contract(strategy: str, factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope=strategy)
    reg = S.registry
    assert isinstance(reg, Registry)
    assert isinstance(reg, ScopedRegistry)
    assert S.strategy is reg.strategy
    with in_scope(S) as session:
        assert reg.has()
        assert reg() is session
        reg.clear()
        assert not reg.has()
        first = reg()
        assert reg.has()
        assert reg() is first
        assert len(reg) == 1
        other = factory()
        reg.set(other)
        assert reg() is other
        reg.clear()
        assert not reg.has()
        assert len(reg) == 0
        reg.clear()  # clearing an empty scope is fine


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_scope_removes_on_exit_also_on_error(strategy: str, factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope=strategy)
    with in_scope(S) as session:
        assert S() is session
        with in_scope(S) as inner:  # nesting shares, only the outermost removes
            assert inner is session
        assert S() is session
        session.execute(text("select 1"))
        assert session.in_transaction()
    assert not session.in_transaction()
    assert len(S.registry) == 0

    class Boom(BaseException):  # like gevent.Timeout or GreenletExit
        pass

    used: list[Session] = []

    def fail_inside() -> None:
        with in_scope(S) as session:
            used.append(session)
            session.execute(text("select 1"))
            raise Boom

    with pytest.raises(Boom):
        fail_inside()
    session = used[0]
    assert not session.in_transaction()
    assert len(S.registry) == 0


def test_token_scope_binds_and_restores(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope="token")
    with S.scope("outer") as outer:
        with S.scope("inner") as inner:
            assert inner is not outer
            assert S() is inner
            assert len(S.registry) == 2
        assert S() is outer
        assert len(S.registry) == 1
    assert len(S.registry) == 0
    with pytest.raises(scoping.NoScopeToken, match=r"Session\.scope\(token\)"):
        S()


def test_token_shared_by_greenlets_is_removed_by_the_last(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope="token")
    main = greenlet.getcurrent()
    seen: list[Session] = []

    def worker() -> None:
        with S.scope("shared") as session:
            seen.append(session)
            main.switch()

    a, b = greenlet.greenlet(worker), greenlet.greenlet(worker)
    a.switch()
    b.switch()
    assert seen[0] is seen[1]
    assert len(S.registry) == 1
    a.switch()  # a leaves: b is still inside, the Session stays
    assert len(S.registry) == 1
    b.switch()
    assert len(S.registry) == 0


def test_many_tokens_leave_nothing_behind(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope="token")
    for request_id in range(10_000):
        with S.scope(request_id):
            S.info["seen"] = True
    assert len(S.registry) == 0
    assert S.registry._watched == {}
    assert S._depth == {}


def test_a_token_whose_end_nobody_can_see_is_not_watched(
    factory: sessionmaker[Session],
) -> None:
    # A request id has no end a strategy can see: no watch() call and no
    # bookkeeping for it (scopes.ENDLESS_KEY_TYPES), only the Session.
    watched: list[object] = []

    class Recording(scoping.TokenScope):
        endless_key_types = scoping.TokenScope.endless_key_types

        def watch(self, key: t.Hashable, on_end: t.Callable[[t.Hashable], None]) -> bool:
            watched.append(key)
            return super().watch(key, on_end)

    S = scoping.scoped_session(factory, scope=Recording())
    for token in ["request-1", 7, ("tenant", 7), uuid.uuid4()]:
        with S.scope(token):
            assert S.registry._watched == {}
            assert len(S.registry) == 1
    assert watched == []
    assert len(S.registry) == 0

    class Tagged(str):
        pass

    # Exact types only: a subclass of str may be a user's unit, and is watched.
    # So is a unit key (scopefunc=greenlet.getcurrent), whose end is signalled.
    with S.scope(Tagged("request-2")):
        S()
    glet = greenlet.getcurrent()
    T = scoping.scoped_session(factory, scope=Recording(scopefunc=lambda: glet))
    T()
    assert watched == ["request-2", glet]
    assert T.registry._watched == {glet: True}
    T.remove()


def test_endless_key_types_are_read_from_the_strategys_own_class(
    factory: sessionmaker[Session],
) -> None:
    class Tenants(scoping.TokenScope):
        """Watches its str keys itself (a tenant that can be retired)."""

        def watch(self, key: t.Hashable, on_end: t.Callable[[t.Hashable], None]) -> bool:
            return False  # "poll me"

    S = scoping.scoped_session(factory, scope=Tenants())
    with S.scope("tenant-a"):
        assert S.registry._watched == {"tenant-a": False}


def test_scopefunc_gives_token_strategy(factory: sessionmaker[Session]) -> None:
    current = ["a"]
    S = scoping.scoped_session(factory, lambda: current[0])
    assert isinstance(S.strategy, scoping.TokenScope)
    a = S()
    current[0] = "b"
    assert S() is not a
    current[0] = "a"
    assert S() is a


def test_scopefunc_greenlet_getcurrent_cleans_up(factory: sessionmaker[Session]) -> None:
    """SQLAlchemy's usual greenlet recipe leaks; through scoping it does not."""
    S = scoping.scoped_session(factory, scopefunc=greenlet.getcurrent)
    sa_registry: ScopedRegistry[Session] = ScopedRegistry(factory, greenlet.getcurrent)
    for _ in range(300):
        greenlet.greenlet(S).switch()
        greenlet.greenlet(sa_registry).switch()
    S.registry.collect()
    assert len(S.registry) == 0
    assert len(sa_registry.registry) == 300


def test_ident_scopefunc_warns(factory: sessionmaker[Session]) -> None:
    with pytest.warns(scoping.ScopingWarning, match="reused"):
        scoping.scoped_session(factory, scopefunc=threading.get_ident)


def test_unknown_strategy_names_valid_ones(factory: sessionmaker[Session]) -> None:
    with pytest.raises(ValueError, match=r"'greenlets'.*'thread', 'greenlet', 'contextvar'"):
        scoping.scoped_session(factory, scope="greenlets")
    with pytest.raises(TypeError, match="current"):
        scoping.scoped_session(factory, scope=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scopefunc"):
        scoping.scoped_session(factory, lambda: 1, scope="greenlet")


def test_unhashable_token(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope="token")
    with pytest.raises(TypeError, match=r"'list'.*'token' strategy"), S.scope([1, 2]):  # type: ignore[arg-type]
        pass
    U = scoping.scoped_session(factory, scopefunc=lambda: {"a": 1})
    with pytest.raises(TypeError, match=r"'dict'.*'token' strategy"):
        U()
    with pytest.raises(TypeError, match=r"'dict'.*'token' strategy"):
        U.info  # noqa: B018 - the proxy path raises the same error


def test_token_given_to_non_token_strategy(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope="greenlet")
    with pytest.raises(TypeError, match="takes no token"), S.scope("abc"):
        pass


def test_call_with_kwargs_when_present_is_sqlalchemys_error(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope="greenlet")
    made = S(autoflush=False)
    assert made.autoflush is False
    with pytest.raises(InvalidRequestError, match="already present"):
        S(autoflush=True)


class FailingClose(Session):
    def close(self) -> None:
        super().close()
        raise KeyboardInterrupt("close interrupted")  # a BaseException, like gevent.Timeout


@pytest.mark.parametrize("strategy", ["thread", "greenlet", "contextvar", "auto"])
def test_remove_clears_even_when_close_raises(strategy: str) -> None:
    engine = create_engine("sqlite://")
    S = scoping.scoped_session(sessionmaker(bind=engine, class_=FailingClose), scope=strategy)
    first = S()
    with pytest.raises(KeyboardInterrupt):
        S.remove()
    assert not S.registry.has()
    assert S() is not first

    # SQLAlchemy's own remove() leaves the Session behind in the same situation.
    from sqlalchemy.orm import scoped_session as sa_scoped_session

    sa = sa_scoped_session(sessionmaker(bind=engine, class_=FailingClose))
    sa_first = sa()
    with pytest.raises(KeyboardInterrupt):
        sa.remove()
    assert sa() is sa_first


def test_close_all_closes_everything_and_raises_first_error(factory: sessionmaker[Session]) -> None:
    closed: list[int] = []

    class Tracking(Session):
        def close(self) -> None:
            closed.append(1)
            super().close()
            if len(closed) == 1:
                raise RuntimeError("first close failed")

    S = scoping.scoped_session(
        sessionmaker(bind=factory.kw["bind"], class_=Tracking), scope="token"
    )
    for token in range(5):
        S.registry.strategy.bind(token)  # type: ignore[attr-defined]
        S()
    assert len(S.registry) == 5
    with pytest.raises(RuntimeError, match="first close failed"):
        S.registry.close_all()
    assert len(closed) == 5
    assert len(S.registry) == 0


def test_collect_failures_are_logged_not_raised(
    factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Session):
        def close(self) -> None:
            raise RuntimeError("broken close")

    S = scoping.scoped_session(
        sessionmaker(bind=factory.kw["bind"], class_=Broken), scope="greenlet"
    )
    greenlet.greenlet(S).switch()
    # collect() retires the dead greenlet's Session and closes it, unless the
    # reaper's poll got there first (collect() then waits for its close): either
    # way the failure is logged once and nothing raises here.
    closed = S.registry.collect()
    assert closed in (0, 1)
    assert len(S.registry) == 0
    assert caplog.text.count("closing the Session of an ended scope failed") == 1


def test_custom_strategy(factory: sessionmaker[Session]) -> None:
    class RequestScope(scoping.BaseScope):
        name = "request"

        def __init__(self) -> None:
            self.request_id = "r1"

        def current(self) -> str:
            return self.request_id

    strategy = RequestScope()
    assert isinstance(strategy, scoping.ScopeStrategy)
    S = scoping.scoped_session(factory, scope=strategy)
    first = S()
    strategy.request_id = "r2"
    assert S() is not first
    assert len(S.registry) == 2
    assert "request" in repr(S)


BUILT_IN_STRATEGY_CLASSES = [
    scoping.ThreadScope,
    scoping.GreenletScope,
    scoping.ContextVarScope,
    scoping.TokenScope,
    scoping.AutoScope,
    scoping.TaskScope,
]


@pytest.mark.parametrize("slotted", [False, True], ids=["dict", "slots"])
@pytest.mark.parametrize("base", BUILT_IN_STRATEGY_CLASSES, ids=lambda c: c.__name__)
def test_a_strategy_subclass_keeps_its_own_current(
    base: type[t.Any], slotted: bool, factory: sessionmaker[Session]
) -> None:
    # The built-in strategies keep current() as a closure in a slot; a
    # subclass's own current() method is its rule, and must not be hidden
    # by that closure (nor refused by a slotted subclass).
    body: dict[str, t.Any] = {"current": lambda self: self.request_id}
    if slotted:
        body["__slots__"] = ("request_id",)
    Request = type("Request", (base,), body)
    strategy = Request()
    strategy.request_id = "r1"
    assert strategy.current() == "r1"
    assert strategy.fast_key() == "r1"
    S = scoping.scoped_session(factory, scope=strategy)
    first = S()
    assert list(S.registry.registry) == ["r1"]
    assert S.info is first.info  # a generated proxy follows the same key
    strategy.request_id = "r2"
    assert S() is not first
    assert sorted(S.registry.registry) == ["r1", "r2"]
    S.remove()
    assert list(S.registry.registry) == ["r1"]


@pytest.mark.parametrize("slotted", [False, True], ids=["dict", "slots"])
@pytest.mark.parametrize("base", BUILT_IN_STRATEGY_CLASSES, ids=lambda c: c.__name__)
def test_a_strategy_subclass_can_wrap_the_built_in_key(
    base: type[t.Any], slotted: bool, factory: sessionmaker[Session]
) -> None:
    # super().current() reaches the built-in key closure (never the
    # subclass's own current() again: TaskScope's closure calls
    # ContextVarScope's, not whatever current() the instance has).
    def current(self: t.Any) -> t.Hashable:
        return ("tenant-a", super(Wrapped, self).current())

    body: dict[str, t.Any] = {"current": current}
    if slotted:
        body["__slots__"] = ()
    Wrapped = type("Wrapped", (base,), body)
    strategy = Wrapped()
    if base is scoping.TokenScope:
        handle = strategy.bind("t")
    try:
        key = strategy.current()
        assert key == ("tenant-a", base().current() if base is not scoping.TokenScope else "t")
        assert strategy.fast_key() == key
        S = scoping.scoped_session(factory, scope=strategy)
        session = S()
        assert list(S.registry.registry) == [key]
        assert S.info is session.info
        S.remove()
        assert len(S.registry) == 0
    finally:
        if base is scoping.TokenScope:
            strategy.reset(handle)


def test_miss_handler_follows_the_strategys_fast_key_rule(factory: sessionmaker[Session]) -> None:
    class Keyed(scoping.BaseScope):
        def current(self) -> str:
            return "real"

    registry = Registry(factory, Keyed())
    assert registry.miss_handler(True) == registry._create  # the fast key is the key
    made = registry.miss_handler(True)("fast")
    assert registry.registry["fast"] is made
    by_current = registry.miss_handler(None)
    assert by_current("ignored") is registry.registry["real"]  # current() decided
    checked = registry.miss_handler(lambda key: key != "no-key")
    assert checked("other") is registry.registry["other"]
    assert checked("no-key") is registry.registry["real"]  # not the key: current() decides
    assert "no-key" not in registry.registry
    registry.close_all()


def test_fast_key_rule_is_each_strategys_own() -> None:
    from scoping.scopes import NO_CONTEXT_KEY, fast_key_kind, fast_key_rule

    def rule(strategy: t.Any) -> t.Any:
        return fast_key_rule(strategy, fast_key_kind(strategy))

    assert rule(scoping.GreenletScope()) is True
    assert rule(scoping.TokenScope()) is True
    assert rule(scoping.TaskScope()) is True  # "exact": its fast key is current()
    for strategy in (scoping.ContextVarScope(), scoping.AutoScope()):
        is_key = rule(strategy)
        assert is_key(NO_CONTEXT_KEY) is False
        assert is_key(NO_CONTEXT_KEY + 16) is True
    thread = scoping.ThreadScope()
    assert callable(rule(thread))
    assert rule(thread)(greenlet.getcurrent().parent or greenlet.getcurrent()) is True
    assert rule(thread)(greenlet.greenlet(lambda: None)) is False  # a raw greenlet, unpatched


def test_a_token_that_is_a_weak_reference_is_its_own_key(factory: sessionmaker[Session]) -> None:
    # ScopeBlock holds unit keys (greenlets, tasks) weakly; a token that is
    # itself a weakref.ref must still be the key its block entered and exits.
    class Request:
        pass

    request = Request()
    token = weakref.ref(request)
    S = scoping.scoped_session(factory, scope="token")
    with S.scope(token) as session:
        assert S() is session
        assert list(S.registry.registry) == [token]
        with S.scope(token) as inner:
            assert inner is session
    assert len(S.registry) == 0


def test_configure_warns_like_sqlalchemy(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope="greenlet")
    S.configure(autoflush=False)  # nothing created yet: silent
    S()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        S.configure(autoflush=True)
    assert any("already present" in str(w.message) for w in caught)


def test_tokens_that_look_like_greenlets_or_tasks_are_just_tokens(
    factory: sessionmaker[Session],
) -> None:
    """No duck typing: only real greenlets and asyncio tasks have an end we watch."""

    class Job:
        done = True  # an attribute, not Future.done()
        dead = True
        parent = None

        def __init__(self, n: int) -> None:
            self.n = n

    jobs = [Job(n) for n in range(200)]
    current = [jobs[0]]
    S = scoping.scoped_session(factory, scopefunc=lambda: current[0])
    for job in jobs:  # more creations than a sweep interval: every key is polled
        current[0] = job
        S()
    S.registry.collect()
    assert len(S.registry) == 200  # none was taken for an ended greenlet or task

    def in_thread() -> None:
        current[0] = Job(-1)
        S()

    th = threading.Thread(target=in_thread)
    th.start()
    th.join()
    assert len(S.registry) == 201  # the thread's exit does not retire a token
