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
import contextvars
import threading
import typing as t

import greenlet
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

import scoping
from scoping.asyncio import async_scoped_session

INLINED = ["thread", "greenlet", "contextvar", "auto"]


@pytest.fixture
def factory() -> t.Iterator[sessionmaker[Session]]:
    engine = create_engine("sqlite://")
    yield sessionmaker(bind=engine)
    engine.dispose()


@pytest.mark.parametrize("strategy", INLINED)
def test_inlined_class_keeps_the_public_name_and_type(
    strategy: str, factory: sessionmaker[Session]
) -> None:
    S = scoping.scoped_session(factory, scope=strategy)
    assert isinstance(S, scoping.scoped_session)
    assert type(S) is not scoping.scoped_session  # the inlined subclass runs
    assert type(S).__name__ == "scoped_session"
    assert repr(S).startswith("<scoping.session.scoped_session ")
    # One class per (class, shape), made once.
    assert type(scoping.scoped_session(factory, scope=strategy)) is type(S)


def test_token_and_custom_strategies_use_the_generic_path(
    factory: sessionmaker[Session],
) -> None:
    assert type(scoping.scoped_session(factory, scope="token")) is scoping.scoped_session

    class Fixed(scoping.BaseScope):
        def current(self) -> t.Hashable:
            return "fixed"

    S = scoping.scoped_session(factory, scope=Fixed())
    assert type(S) is scoping.scoped_session
    assert S() is S._proxied


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
    session = S()
    assert S.info is session.info
    assert seen == ["proxied"]
    S.remove()


def test_a_plain_subclass_gets_the_inlined_path_and_stays_itself(
    factory: sessionmaker[Session],
) -> None:
    class Mine(scoping.scoped_session[Session]):
        def hello(self) -> str:
            return "hi"

    S = Mine(factory, scope="auto")
    assert isinstance(S, Mine)
    assert type(S) is not Mine
    assert type(S).__name__ == "Mine"
    assert S.hello() == "hi"
    assert S() is S._proxied


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
