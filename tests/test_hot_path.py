"""The inlined hot paths of ``scoping.scoped_session`` and the rules they inline.

``tests/test_lifecycle.py::test_fast_key_equals_current`` holds each inlined
key equal to ``strategy.current()`` in every runtime; ``tests/test_call_budget.py``
counts the calls. Here: which class runs, that a user's subclass keeps its own
code, that ``remove()`` finds the Session where the inlined key is not the key,
and the rule ``"auto"`` inlines (the Context, tasks included) against
:class:`scoping.TaskScope`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import inspect
import threading
import typing as t

import greenlet
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm import scoped_session as _sa_scoped_session

import scoping
from scoping import _hot_path
from scoping.asyncio import async_scoped_session

STRATEGIES = list(scoping.scopes.STRATEGY_NAMES)


@contextlib.contextmanager
def _bound(S: t.Any, strategy: str) -> t.Iterator[None]:
    """A token bound for the token strategy; nothing to do for the others."""
    handle = S.strategy.bind("t") if strategy == "token" else None
    try:
        yield
    finally:
        if handle is not None:
            S.strategy.reset(handle)


class Fixed(scoping.BaseScope):
    """A custom strategy: its key is called, "exact"."""

    def current(self) -> t.Hashable:
        return "fixed"


@pytest.fixture
def factory() -> t.Iterator[sessionmaker[Session]]:
    engine = create_engine("sqlite://")
    yield sessionmaker(bind=engine)
    engine.dispose()


@pytest.mark.parametrize("strategy", [*STRATEGIES, "custom"])
def test_generated_class_keeps_the_public_name_and_type(
    strategy: str, factory: sessionmaker[Session]
) -> None:
    scope: t.Any = Fixed() if strategy == "custom" else strategy
    S = scoping.scoped_session(factory, scope=scope)
    assert isinstance(S, scoping.scoped_session)
    assert type(S) is not scoping.scoped_session  # the generated subclass runs
    assert type(S).__name__ == "scoped_session"
    assert type(S).__qualname__ == "scoped_session"
    assert type(S).__doc__ == scoping.scoped_session.__doc__
    assert repr(S).startswith("<scoping.session.scoped_session ")
    # One class per (class, shape), made once.
    assert type(scoping.scoped_session(factory, scope=scope)) is type(S)
    with _bound(S, strategy):
        assert S() is S._proxied is S.registry()
        S.remove()
        assert len(S.registry) == 0


def test_a_generated_class_called_again_picks_the_new_strategys_path(
    factory: sessionmaker[Session],
) -> None:
    # type(S)(...) must not keep S's key shape for another strategy.
    S = scoping.scoped_session(factory, scope="contextvar")
    T = type(S)(factory, scope="token", scopefunc=None)
    assert type(T) is type(scoping.scoped_session(factory, scope="token"))
    assert type(T) is not type(S)
    with T.scope("a") as a:
        assert T() is a
    with T.scope("b") as b:
        assert b is not a


def test_every_sqlalchemy_proxy_is_generated_with_its_signature(
    factory: sessionmaker[Session],
) -> None:
    methods, attributes = _hot_path.sqlalchemy_proxies()
    # The known core of SQLAlchemy's list (2.0 and 2.1): the detection finds it.
    assert {"add", "commit", "execute", "get", "rollback", "scalars", "__iter__"} <= set(methods)
    assert {"info", "bind", "dirty", "autoflush", "no_autoflush"} <= set(attributes)
    for strategy in STRATEGIES:
        generated = vars(type(scoping.scoped_session(factory, scope=strategy)))
        for name in methods:
            ours, theirs = generated[name], vars(_sa_scoped_session)[name]
            assert inspect.signature(ours) == inspect.signature(theirs), name
            assert ours.__doc__ == theirs.__doc__, name
            assert ours.__qualname__ == f"scoped_session.{name}"
        for name in attributes:
            ours, theirs = generated[name], vars(_sa_scoped_session)[name]
            assert ours.__doc__ == theirs.__doc__, name
            assert ours.fset is theirs.fset, name


def _call_arguments(name: str, func: t.Any) -> tuple[list[object], dict[str, object]]:
    """A call of ``func`` giving every parameter a distinct sentinel."""
    args: list[object] = []
    kwargs: dict[str, object] = {}
    for param in list(inspect.signature(func).parameters.values())[1:]:
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            args.append(f"{name}.{param.name}")
        elif param.kind is param.VAR_POSITIONAL:
            args.extend([f"{name}.*1", f"{name}.*2"])
        elif param.kind is param.KEYWORD_ONLY:
            kwargs[param.name] = f"{name}.{param.name}"
        else:
            kwargs["extra_keyword"] = f"{name}.**"
    return args, kwargs


@pytest.mark.parametrize("strategy", [*STRATEGIES, "custom"])
def test_every_generated_proxy_forwards_as_sqlalchemys_does(
    strategy: str, factory: sessionmaker[Session]
) -> None:
    # Each Session method is replaced on the instance by a recorder; the
    # generated proxy and SQLAlchemy's own, called alike, must reach the same
    # Session with the same arguments (bound to the Session method's signature).
    S = scoping.scoped_session(factory, scope=Fixed() if strategy == "custom" else strategy)
    with _bound(S, strategy):
        _check_forwarding(S)


def _check_forwarding(S: scoping.scoped_session[Session]) -> None:
    session = S()
    methods, _ = _hot_path.sqlalchemy_proxies()
    calls: list[tuple[str, dict[str, object]]] = []
    for name in methods:
        signature = inspect.signature(getattr(Session, name))

        def record(*a: object, _name: str = name, _sig: t.Any = signature, **kw: object) -> str:
            calls.append((_name, dict(_sig.bind(session, *a, **kw).arguments)))
            return _name

        setattr(session, name, record)
    for name in methods:
        args, kwargs = _call_arguments(name, vars(_sa_scoped_session)[name])
        assert getattr(type(S), name)(S, *args, **kwargs) == name
        assert vars(_sa_scoped_session)[name](S, *args, **kwargs) == name
        ours, theirs = calls[-2:]
        assert ours == theirs, name
    S.remove()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generated_attributes_read_and_set_the_current_session(
    strategy: str, factory: sessionmaker[Session]
) -> None:
    S = scoping.scoped_session(factory, scope=strategy)
    with S.scope("t" if strategy == "token" else None) as session:
        assert S.info is session.info
        S.autoflush = False  # SQLAlchemy's setter, through _proxied
        assert session.autoflush is False
        assert S.autoflush is False
        assert S.is_active is session.is_active
        assert list(S) == []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_generated_proxy_misses_into_the_strategy(
    strategy: str, factory: sessionmaker[Session]
) -> None:
    # The first use of a scope through a proxy (not Session()) makes its Session.
    S = scoping.scoped_session(factory, scope=strategy)
    out: list[object] = []

    def first_use() -> None:
        if strategy == "token":
            with S.scope("g"):
                out.extend([S.info, S.registry().info])
        else:
            out.extend([S.info, S.registry().info])
            S.remove()

    greenlet.greenlet(first_use).switch()
    thread = threading.Thread(target=first_use)
    thread.start()
    thread.join()
    assert out[0] is out[1]
    assert out[2] is out[3]
    assert out[0] is not out[2]


def test_a_subclass_that_overrides_the_hot_path_keeps_its_own(
    factory: sessionmaker[Session],
) -> None:
    seen: list[str] = []

    class Traced(scoping.scoped_session[Session]):
        @property
        def _proxied(self) -> Session:
            seen.append("proxied")
            return super()._proxied

    S = Traced(factory, scope="contextvar")
    assert type(S) is Traced
    session = S()  # Session() goes through the subclass's _proxied too
    assert S.info is session.info
    assert seen == ["proxied", "proxied"]
    S.remove()


def test_a_subclass_keeps_the_proxies_it_defines(factory: sessionmaker[Session]) -> None:
    added: list[object] = []

    class Mine(scoping.scoped_session[Session]):
        def hello(self) -> str:
            return "hi"

        def add(self, instance: object, _warn: bool = True) -> None:
            added.append(instance)

    S = Mine(factory, scope="auto")
    assert isinstance(S, Mine)
    assert type(S) is not Mine
    assert type(S).__name__ == "Mine"
    assert S.hello() == "hi"
    assert S() is S._proxied
    assert "add" not in vars(type(S))  # the subclass's add runs
    assert "commit" in vars(type(S))  # SQLAlchemy's proxies are generated
    S.add("x")
    assert added == ["x"]
    assert len(S().new) == 0
    S.remove()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_subclass_keeps_its_own_remove(strategy: str, factory: sessionmaker[Session]) -> None:
    removed: list[Session] = []

    class Logged(scoping.scoped_session[Session]):
        def remove(self) -> None:
            removed.append(self())
            super().remove()

    S = Logged(factory, scope=strategy)
    assert "remove" not in vars(type(S))  # the subclass's remove() runs
    with _bound(S, strategy):
        session = S()
        S.remove()
        assert removed == [session]
        assert S() is not session  # super().remove() still ended the Session
        S.remove()


def test_thread_remove_in_a_raw_greenlet_finds_the_threads_session(
    factory: sessionmaker[Session],
) -> None:
    # Unpatched, a raw greenlet shares its thread's Session: the running
    # greenlet (the inlined key) is not the key, the thread's main greenlet is.
    S = scoping.scoped_session(factory, scope="thread")
    outer = S()
    out: list[object] = []

    def inner() -> None:
        out.append(S())
        S.remove()
        out.append(len(S.registry))

    greenlet.greenlet(inner).switch()
    assert out == [outer, 0]
    assert S() is not outer


@pytest.mark.parametrize("strategy", ["contextvar", "auto"])
def test_context_remove_before_any_context_is_a_no_op(
    strategy: str, factory: sessionmaker[Session]
) -> None:
    S = scoping.scoped_session(factory, scope=strategy)
    kept = S()
    out: list[object] = []

    def fresh() -> None:
        out.append(greenlet.getcurrent().gr_context)
        S.remove()  # no Context yet, so no Session: nothing to do
        out.append(len(S.registry))

    greenlet.greenlet(fresh).switch()
    assert out == [None, 1]
    assert S() is kept
    S.remove()


def _two_tasks_sharing_one_context(S: t.Any) -> tuple[object, object]:
    async def use() -> object:
        session = S()
        await asyncio.sleep(0)
        return session

    async def main() -> tuple[object, object]:
        shared = contextvars.copy_context()
        first = asyncio.get_running_loop().create_task(use(), context=shared)
        second = asyncio.get_running_loop().create_task(use(), context=shared)
        return await first, await second

    return asyncio.run(main())


def test_auto_keys_a_task_by_its_context(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory)  # auto
    first, second = _two_tasks_sharing_one_context(S)
    assert first is second  # they share the Context, as with "contextvar"

    async def own() -> tuple[object, object]:
        async def use() -> object:
            return S()

        return await asyncio.gather(use(), use())  # each task copies the context

    a, b = asyncio.run(own())
    assert a is not b


def test_task_scope_keys_a_task_by_the_task(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope=scoping.TaskScope())
    first, second = _two_tasks_sharing_one_context(S)
    assert first is not second
    outside = S()
    assert S.strategy.current() == scoping.ContextVarScope().current()  # outside a task
    assert S() is outside
    S.remove()


def test_async_scoped_session_auto_is_the_task_rule() -> None:
    from sqlalchemy.ext.asyncio import async_sessionmaker

    S = async_scoped_session(async_sessionmaker())
    assert type(S.strategy) is scoping.TaskScope
    assert S.strategy.name == "task"
    assert type(async_scoped_session(async_sessionmaker(), scope="contextvar").strategy) is (
        scoping.ContextVarScope
    )


def test_auto_to_thread_gets_its_own_session(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory)
    seen: list[tuple[object, str]] = []

    def work() -> None:
        seen.append((S(), threading.current_thread().name))

    async def main() -> object:
        mine = S()
        await asyncio.to_thread(work)
        await asyncio.to_thread(work)
        return mine

    mine = asyncio.run(main())
    sessions = [s for s, _ in seen]
    assert len({id(s) for s in [mine, *sessions]}) == 3


@pytest.mark.parametrize("strategy", ["token", "contextvar"])
def test_a_copy_keeps_its_class(strategy: str, factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope=strategy)
    assert type(copy.copy(S)) is type(S)


def test_token_shape_reads_the_blocks_binding_and_falls_back_to_the_strategy(
    factory: sessionmaker[Session],
) -> None:
    # The "token" key shape reads the live binding inline; every other case
    # (no block, a dead binding in a copied context) is the strategy's answer.
    S = scoping.scoped_session(factory, scope="token")
    assert type(S)._hot_path_kind == "token"
    with pytest.raises(scoping.NoScopeToken):
        S()
    with pytest.raises(scoping.NoScopeToken):
        S.info  # noqa: B018
    with S.scope("a") as a:
        assert S() is a
        assert S.info is a.info
        with S.scope("b") as b:
            assert S() is b is not a
        assert S() is a
        copied = contextvars.copy_context()
    with pytest.raises(scoping.ScopeEnded):
        copied.run(S)
    with pytest.raises(scoping.ScopeEnded):
        copied.run(lambda: S.info)
    assert len(S.registry) == 0


def test_token_over_a_scopefunc_calls_it_and_a_block_still_wins(
    factory: sessionmaker[Session],
) -> None:
    current = ["r1"]
    S = scoping.scoped_session(factory, scopefunc=lambda: current[0])
    T = scoping.scoped_session(factory, scope=scoping.TokenScope(scopefunc=lambda: current[0]))
    for proxy in (S, T):
        assert type(proxy)._hot_path_kind == "exact"  # no binding read per lookup
        first = proxy()
        assert proxy.info is first.info
        current[0] = "r2"
        assert proxy() is not first
        with proxy.scope("block") as block:
            assert proxy() is block
        proxy.remove()
        current[0] = "r1"
        assert proxy() is first
        proxy.remove()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_an_async_session_gets_sqlalchemys_deprecation_warning(strategy: str) -> None:
    # As SQLAlchemy's scoped_session does: checked where the Session is made.
    from sqlalchemy.exc import SADeprecationWarning
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    S: t.Any = scoping.scoped_session(async_sessionmaker(), scope=strategy)
    with _bound(S, strategy):
        with pytest.warns(SADeprecationWarning, match="async_scoped_session"):
            session = S()
        assert isinstance(session, AsyncSession)
        assert S() is session
        S.registry.clear()


def test_a_subclass_that_fixes_the_strategy_in_its_init_gets_that_hot_path(
    factory: sessionmaker[Session],
) -> None:
    # __new__ sees only the call's arguments (scope defaults to "auto"); the
    # strategy this subclass passes on must decide the key, never the Context.
    class RequestScoped(scoping.scoped_session[Session]):
        def __init__(self, session_factory: sessionmaker[Session]) -> None:
            super().__init__(session_factory, scope="token")

    S = RequestScoped(factory)
    assert type(S)._hot_path_kind == "token"
    assert isinstance(S, RequestScoped)
    with S.scope("a") as a:
        assert S() is a
        assert S.info is a.info
    with S.scope("b") as b:
        assert S() is b is not a
    assert len(S.registry) == 0
