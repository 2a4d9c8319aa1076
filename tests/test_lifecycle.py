"""Lifecycle edges of issue 9 (items 2-10): thread hops, shared and copied
contexts, re-entered blocks, leaks, ended threads, the guard and bad input.

Fork (item 1) is in tests/test_fork.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import gc
import sys
import textwrap
import threading
import time
import typing as t
import weakref

import greenlet
import pytest
import sqlalchemy
from sqlalchemy import Integer, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import scoping
from scoping import _units
from scoping.scopes import STRATEGY_NAMES

RUNTIMES = ["threads", "raw-greenlets", "asyncio-tasks"]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "lifecycle_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)


@pytest.fixture
def factory(sqlite_url: str) -> t.Iterator[sessionmaker[Session]]:
    engine = create_engine(sqlite_url)  # a file: every thread sees the same tables
    Base.metadata.create_all(engine)
    yield sessionmaker(bind=engine)
    engine.dispose()


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> list[t.Any]:
    """Exceptions that escaped from callbacks (weakref, GC, thread exit)."""
    seen: list[t.Any] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    return seen


# --- layout: the strategy's fast key is its current() in every runtime ------

FAST_KEY_PROBE = """
    made = S()  # makes the Context where one is needed
    key = S.strategy.current()
    # where the strategy says its fast key is the key (a miss then skips current())
    is_key = getattr(S.strategy, "fast_key_is_key", None)
    claims = is_key is True or (callable(is_key) and is_key(S.strategy.fast_key()))
    out.append([
        not claims or S.strategy.fast_key() == key,
        S.registry.registry.get(key) is made,  # current() keys the Session
        S._proxied is made,  # the session's inlined / fast path finds it
        S() is made,
        len(S.registry.registry) == before + 1,  # and never made a second one
        # the fast key is the key, or (kinds other than "exact") never a key
        S.strategy.fast_key() == key
        or (S.strategy.fast_key_kind != "exact"
            and S.strategy.fast_key() not in S.registry.registry),
    ])
"""


def _probe(S: scoping.scoped_session[Session], out: list[list[bool]]) -> None:
    before = len(S.registry.registry)
    exec(textwrap.dedent(FAST_KEY_PROBE), {"S": S, "out": out, "before": before})


@pytest.mark.parametrize("runtime", [*RUNTIMES, "to_thread"])
@pytest.mark.parametrize("strategy", ["thread", "greenlet", "contextvar", "auto"])
def test_fast_key_equals_current(
    strategy: str, runtime: str, factory: sessionmaker[Session]
) -> None:
    S = scoping.scoped_session(factory, scope=strategy)
    out: list[list[bool]] = []
    if runtime == "threads":
        th = threading.Thread(target=_probe, args=(S, out))
        th.start()
        th.join()
    elif runtime == "raw-greenlets":
        greenlet.greenlet(_probe).switch(S, out)
    elif runtime == "asyncio-tasks":

        async def task() -> None:
            _probe(S, out)

        asyncio.run(task())
    else:

        async def hop() -> None:
            await asyncio.to_thread(_probe, S, out)

        asyncio.run(hop())
    assert out == [[True] * 6]


def test_fast_key_equals_current_under_gevent() -> None:
    from tests._subproc import run_python

    code = f"""
        from gevent import monkey; monkey.patch_all()
        import json, textwrap, gevent, scoping
        from sqlalchemy import create_engine
        from sqlalchemy.orm import sessionmaker
        factory = sessionmaker(bind=create_engine("sqlite://"))
        results = {{}}
        for name in scoping.scopes.STRATEGY_NAMES:
            if name == "token":
                continue
            S = scoping.scoped_session(factory, scope=name)
            out = []
            def probe():
                before = len(S.registry.registry)
                exec(textwrap.dedent({FAST_KEY_PROBE!r}), {{"S": S, "out": out, "before": before}})
            gevent.joinall([gevent.spawn(probe) for _ in range(3)], raise_error=True)
            results[name] = out
        print(json.dumps(results))
    """
    results = run_python(code)
    assert results == {
        name: [[True] * 6] * 3 for name in ("thread", "greenlet", "contextvar", "auto")
    }


# --- item 2: auto and asyncio.to_thread ---------------------------------------


def test_auto_to_thread_never_shares_and_cleans_up(
    factory: sessionmaker[Session], unraisable: list[t.Any]
) -> None:
    S = scoping.scoped_session(factory)  # auto
    seen: list[Session] = []  # kept alive, so that no two can share an id
    failed: list[int] = []

    def work(i: int) -> None:
        seen.append(S())
        S.add(Item(id=i))
        if i == 0:
            failed.append(i)
            return  # a failed request leaves its pending row behind
        assert [o.id for o in S.new] == [i]  # never another task's row
        S.commit()

    loop_errors: list[dict[str, t.Any]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
        for i in range(3):
            await asyncio.create_task(asyncio.to_thread(work, i))
        ctx = contextvars.copy_context()
        await loop.run_in_executor(None, ctx.run, work, 3)

    asyncio.run(main())
    assert len({id(s) for s in seen}) == 4
    assert failed == [0]
    deadline = time.monotonic() + 15  # milliseconds on an idle machine
    while len(S.registry) and time.monotonic() < deadline:
        time.sleep(0.01)
    S.registry.collect()
    assert len(S.registry) == 0  # each call's Session ended with its Context
    with factory() as check:
        assert sorted(check.scalars(sqlalchemy.select(Item.id))) == [1, 2, 3]
    assert unraisable == []


# --- item 3: close_all and busy Sessions ---------------------------------------


def test_close_all_skips_a_busy_session_and_does_not_add_callbacks(
    factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    from scoping import registry as registry_module

    S = scoping.scoped_session(factory, scope="thread")
    S.execute(text("select 1"))
    before = _units.thread_exit_callbacks()
    for _ in range(100):
        S.execute(text("select 1"))
        assert S.registry.close_all() == 1
    assert _units.thread_exit_callbacks() == before
    busy = S()
    busy.execute(text("select 1"))
    monkeypatch.setattr(registry_module, "_is_busy", lambda s: s is busy)
    assert S.registry.close_all() == 0
    assert S() is busy
    S.remove()


def test_close_all_never_blocks_the_hub_on_a_session_inside_a_query(pg_url: str) -> None:
    from tests._subproc import run_python

    code = f"""
        from gevent import monkey; monkey.patch_all()
        import json, time, gevent, scoping, scoping.green
        from sqlalchemy import create_engine, text
        from sqlalchemy.orm import sessionmaker
        scoping.green.patch_psycopg2()
        engine = create_engine({pg_url!r})
        S = scoping.scoped_session(sessionmaker(bind=engine), scope="greenlet")
        def slow():
            S.execute(text("select pg_sleep(2)"))  # a blocking close_all waits >= 1.7 s
            S.remove()
        g = gevent.spawn(slow)
        gevent.sleep(0.3)
        t0 = time.monotonic()
        closed = S.registry.close_all()
        took = time.monotonic() - t0
        g.join()
        print(json.dumps({{"closed": closed, "fast": took < 1.5, "ok": g.successful()}}))
    """
    assert run_python(code, timeout=60) == {"closed": 0, "fast": True, "ok": True}


# --- item 4: a scope() object entered twice -----------------------------------


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_scope_object_entered_twice_is_refused(
    strategy: str, factory: sessionmaker[Session]
) -> None:
    S = scoping.scoped_session(factory, scope=strategy)
    blk = S.scope("t") if strategy == "token" else S.scope()
    with blk, pytest.raises(scoping.ScopeReentered, match=r"call Session\.scope\(\) again"):
        blk.__enter__()
    assert len(S.registry) == 0
    if strategy == "token":
        assert not S.registry.has()  # the token is unbound again
    with blk:  # usable again once exited
        pass


# --- item 5: a child that outlives its token block -------------------------------


def test_token_inherited_by_a_late_task_is_refused(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope="token")
    errors: list[BaseException] = []

    async def child() -> None:
        await asyncio.sleep(0.01)  # the parent's block has exited by now
        try:
            S.add(Item(id=99))
        except scoping.ScopeEnded as exc:
            errors.append(exc)

    async def main() -> None:
        with S.scope("req"):
            task = asyncio.create_task(child())
        await task
        with S.scope("req") as later:
            assert not later.new  # never sees the child's work

    asyncio.run(main())
    assert len(errors) == 1
    assert "outlived it" in str(errors[0])
    assert len(S.registry) == 0

    # Even while another block has bound an equal token: never its Session.
    late = None
    with S.scope("req3"):
        late = greenlet.greenlet(lambda: S())
        late.gr_context = contextvars.copy_context()
    with S.scope("req3") as current_block, pytest.raises(scoping.ScopeEnded):
        late.switch()
    assert current_block is not None

    # The same with a greenlet given a copy of the context.
    g = None
    with S.scope("req2"):
        g = greenlet.greenlet(lambda: S())
        g.gr_context = contextvars.copy_context()
    with pytest.raises(scoping.ScopeEnded):
        g.switch()
    assert len(S.registry) == 0


# --- item 6: one Context shared by two live units ---------------------------------


def test_contextvar_shared_context_outlives_its_first_unit(
    factory: sessionmaker[Session], unraisable: list[t.Any]
) -> None:
    S = scoping.scoped_session(factory, scope="contextvar")
    holder = [contextvars.copy_context()]
    got: list[Session] = []

    async def first() -> None:
        got.append(S())

    async def second() -> None:
        await asyncio.sleep(0.02)  # first has ended meanwhile
        session = S()
        got.append(session)
        session.execute(text("select 1"))

    async def main() -> None:
        ctx = holder[0]
        await asyncio.gather(
            asyncio.create_task(first(), context=ctx), asyncio.create_task(second(), context=ctx)
        )

    asyncio.run(main())
    assert got[0] is got[1]
    S.registry.collect()
    assert len(S.registry) == 1
    assert got[0].in_transaction()
    holder.clear()  # the last reference to the shared Context
    gc.collect()
    S.registry.collect()
    assert unraisable == []
    assert len(S.registry) == 0
    assert not got[0].in_transaction()


def test_contextvar_shared_gr_context_between_raw_greenlets(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope="contextvar")
    main = greenlet.getcurrent()
    ctx = contextvars.copy_context()
    sessions: list[Session] = []

    def first() -> None:
        sessions.append(S())

    def second() -> None:
        main.switch()
        sessions.append(S())

    a, b = greenlet.greenlet(first), greenlet.greenlet(second)
    a.gr_context = b.gr_context = ctx
    b.switch()
    a.switch()  # a makes the Session and dies
    del a
    S.registry.collect()
    b.switch()
    assert sessions[0] is sessions[1]
    assert len(S.registry) == 1


# --- item 7: leaks ----------------------------------------------------------------


def test_dropped_per_tenant_engines_are_collected(unraisable: list[t.Any]) -> None:
    refs: list[weakref.ref[sqlalchemy.Engine]] = []
    go, done = threading.Event(), threading.Event()
    tenants: list[scoping.scoped_session[Session]] = []

    def long_lived() -> None:
        for _ in range(20):
            engine = create_engine("sqlite://")
            refs.append(weakref.ref(engine))
            S = scoping.scoped_session(sessionmaker(bind=engine), scope="thread")
            S.execute(text("select 1"))
            S.remove()
            S.registry.close_all()
            tenants.append(S)
            del S, engine
        done.set()
        go.wait(10)

    th = threading.Thread(target=long_lived)
    th.start()
    assert done.wait(10)
    tenants.clear()
    gc.collect()
    alive = sum(ref() is not None for ref in refs)
    go.set()
    th.join()
    assert alive == 0
    assert unraisable == []


def test_contextvar_raw_greenlets_with_scope_keep_nothing(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope="contextvar")
    refs: list[weakref.ref[greenlet.greenlet]] = []

    def request() -> None:
        with S.scope():
            S.execute(text("select 1"))

    for _ in range(300):
        g = greenlet.greenlet(request)
        refs.append(weakref.ref(g))
        g.switch()
        del g
    gc.collect()
    assert sum(r() is not None for r in refs) == 0
    assert len(S.strategy._refs) <= 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("strategy", ["greenlet", "contextvar", "auto"])
def test_abandoned_suspended_raw_greenlets_run_their_finally(
    strategy: str, factory: sessionmaker[Session], unraisable: list[t.Any]
) -> None:
    S = scoping.scoped_session(factory, scope=strategy)
    main = greenlet.getcurrent()
    finished: list[int] = []

    def request(i: int) -> None:
        try:
            S.execute(text("select 1"))
            main.switch()  # suspended for good: nobody switches back
        finally:
            finished.append(i)

    for i in range(10):  # each holds a pooled connection (pool: 5 + 10)
        greenlet.greenlet(request).switch(i)
    S.registry.collect()
    gc.collect()
    S.registry.collect()
    assert unraisable == []
    assert len(finished) == 10
    assert len(S.registry) == 0


@pytest.mark.parametrize("strategy", ["greenlet", "contextvar", "auto"])
def test_abandoned_greenlet_suspended_inside_a_scope_block_is_released(
    strategy: str, factory: sessionmaker[Session], unraisable: list[t.Any]
) -> None:
    """The block lives in the greenlet's own frame: it must not keep the greenlet alive.

    Found by tests/test_properties.py: the block's key (and scoped_session's count of
    live blocks) held the greenlet strongly, a cycle through its frame, so the registry
    could never let the greenlet go and its finally blocks never ran.
    """
    S = scoping.scoped_session(factory, scope=strategy)
    main = greenlet.getcurrent()
    finished: list[int] = []

    def request(i: int) -> None:
        try:
            with S.scope():
                S.execute(text("select 1"))
                main.switch()  # suspended for good inside the block
        finally:
            finished.append(i)

    for i in range(10):
        greenlet.greenlet(request).switch(i)
    S.registry.collect()
    gc.collect()
    S.registry.collect()
    assert unraisable == []
    assert sorted(finished) == list(range(10))
    assert len(S.registry) == 0
    assert not S._depth
    assert not S._unit_depth


# --- item 8: an ended thread's Session is closed without further use --------------


@pytest.mark.parametrize("strategy", ["thread", "greenlet", "contextvar", "auto"])
def test_ended_threads_lock_is_released_without_any_other_use(
    strategy: str, pg_engine: sqlalchemy.Engine
) -> None:
    table = f"locks_{strategy}"
    with pg_engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        conn.execute(text(f"CREATE TABLE {table} (id int primary key, n int)"))
        conn.execute(text(f"INSERT INTO {table} VALUES (1, 0)"))
    S = scoping.scoped_session(sessionmaker(bind=pg_engine), scope=strategy)

    def forgetful() -> None:
        S.execute(text(f"UPDATE {table} SET n = n + 1 WHERE id = 1"))  # no remove()

    th = threading.Thread(target=forgetful)
    th.start()
    th.join()
    t0 = time.monotonic()
    while pg_engine.pool.checkedout() and time.monotonic() - t0 < 15:  # ms when idle
        time.sleep(0.005)
    assert pg_engine.pool.checkedout() == 0, "nothing touched the registry: the reaper must"
    assert len(S.registry) == 0


# --- item 9: the guard ---------------------------------------------------------------


@pytest.mark.parametrize(
    "misuse",
    ["add", "commit-empty", "rollback", "close", "get-identity-map"],
)
def test_guard_catches_every_foreign_use(misuse: str, factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope="greenlet", guard=True)
    shared = S()
    shared.add(Item(id=1))
    shared.commit()
    item = shared.get(Item, 1)
    caught: list[str] = []

    def foreign() -> None:
        try:
            if misuse == "add":
                shared.add(Item(id=2))
            elif misuse == "commit-empty":
                shared.commit()
            elif misuse == "rollback":
                shared.rollback()
            elif misuse == "close":
                shared.close()
            else:
                assert shared.get(Item, 1) is item
        except scoping.ScopeViolation as exc:
            caught.append(str(exc))

    greenlet.greenlet(foreign).switch()
    assert len(caught) == 1
    assert "call the scoped_session proxy" in caught[0]
    assert not shared.new  # nothing foreign was added


def test_guard_parent_and_child_sharing_a_token_in_turns(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope="token", guard=True)

    async def child() -> int:
        return int(S.execute(text("select 2")).scalar_one())

    async def main() -> None:
        with S.scope("req"):
            assert S.execute(text("select 1")).scalar_one() == 1  # transaction open
            assert await asyncio.create_task(child()) == 2
            assert S.execute(text("select 3")).scalar_one() == 3

    asyncio.run(main())


# --- item 10: bad input ---------------------------------------------------------------


def test_bad_input_is_refused_up_front(factory: sessionmaker[Session]) -> None:
    with pytest.raises(TypeError, match="guard= must be True or False"):
        scoping.scoped_session(factory, guard="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sessionmaker"):
        scoping.scoped_session(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scopefunc='x' is not callable"):
        scoping.scoped_session(factory, scopefunc="x")  # type: ignore[arg-type]
    S = scoping.scoped_session(factory, scopefunc=lambda: None)
    with pytest.raises(scoping.NoScopeToken, match="returned None"):
        S()


def test_raising_scopefunc_is_called_once_per_access(factory: sessionmaker[Session]) -> None:
    calls: list[int] = []

    def scopefunc() -> str:
        calls.append(1)
        raise KeyError("no request")

    S = scoping.scoped_session(factory, scopefunc=scopefunc)
    with pytest.raises(KeyError):
        S.info  # noqa: B018
    with pytest.raises(KeyError):
        S()
    assert len(calls) == 2


def test_custom_strategy_whose_watch_raises_keeps_nothing(factory: sessionmaker[Session]) -> None:
    class Broken(scoping.BaseScope):
        name = "broken"

        def current(self) -> str:
            return "k"

        def watch(self, key: t.Hashable, on_end: t.Any) -> bool:
            raise RuntimeError("boom")

    S = scoping.scoped_session(factory, scope=Broken())
    with pytest.raises(scoping.ScopingError, match="fix watch\\(\\)"):
        S()
    assert len(S.registry) == 0


def test_retired_session_interrupted_while_closing_is_kept_queued(
    factory: sessionmaker[Session],
) -> None:
    attempts: list[int] = []

    class Interrupted(Session):
        def close(self) -> None:
            attempts.append(1)
            if len(attempts) == 1:
                raise KeyboardInterrupt
            super().close()

    S = scoping.scoped_session(sessionmaker(bind=factory.kw["bind"], class_=Interrupted))
    S.registry._retired.append(S.session_factory())  # as a retired scope's Session
    with pytest.raises(KeyboardInterrupt):
        S.registry.collect()
    assert len(S.registry._retired) == 1  # not dropped: the close did not finish
    assert S.registry.collect() == 1
    assert len(attempts) == 2
    assert not S.registry._retired
