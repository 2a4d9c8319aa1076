"""scoping.asyncio.async_scoped_session: strategies, self-cleaning, scope(), guard, children.

Tests without a database use AsyncSessions with no bind (closing one does no
I/O); the PostgreSQL ones run each driver (asyncpg, psycopg 3 async) in a
fresh interpreter under ``-W error`` and report every warning, loop error,
unraisable exception and log record they saw.
"""

from __future__ import annotations

import asyncio
import collections
import json
import typing as t

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scoping import NoScopeToken, ScopeEnded, ScopeReentered, ScopeViolation
from scoping.asyncio import async_scoped_session
from stress.childproc import run_json

DRIVERS = ["asyncpg", "psycopg"]


class CountingSession(AsyncSession):
    """Counts close() calls per instance (no bind: close does no I/O)."""

    closed: t.ClassVar[list[CountingSession]] = []

    async def close(self) -> None:
        CountingSession.closed.append(self)
        await super().close()


@pytest.fixture
def factory() -> t.Iterator[async_sessionmaker[CountingSession]]:
    CountingSession.closed = []
    return async_sessionmaker(class_=CountingSession)


def async_url(pg_url: str, driver: str) -> str:
    return make_url(pg_url).set(drivername=f"postgresql+{driver}").render_as_string(False)


# -- construction ---------------------------------------------------------------


@pytest.mark.parametrize("scope", ["thread", "greenlet"])
def test_per_thread_strategies_are_refused(scope: str) -> None:
    with pytest.raises(ValueError, match="scope='auto'"):
        async_scoped_session(async_sessionmaker(), scope=scope)


def test_bad_input_is_refused_up_front() -> None:
    with pytest.raises(TypeError, match="async_sessionmaker"):
        async_scoped_session(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="True or False"):
        async_scoped_session(async_sessionmaker(), guard="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not callable"):
        async_scoped_session(async_sessionmaker(), scopefunc="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown scope strategy"):
        async_scoped_session(async_sessionmaker(), scope="nope")


def test_sqlalchemy_scopefunc_still_works(factory: async_sessionmaker[CountingSession]) -> None:
    S = async_scoped_session(factory, asyncio.current_task)

    async def main() -> None:
        async def one() -> AsyncSession:
            return S()

        a, b = await asyncio.gather(one(), one())
        assert a is not b
        await asyncio.sleep(0.01)
        # current_task keys are tasks: watched and closed when they end
        assert len(S.registry) == 0
        assert set(CountingSession.closed) == {a, b}

    asyncio.run(main())


# -- one Session per task, self-cleaning ----------------------------------------


@pytest.mark.parametrize("scope", ["auto", "contextvar"])
def test_one_session_per_task_closed_on_the_loop(
    scope: str, factory: async_sessionmaker[CountingSession]
) -> None:
    S = async_scoped_session(factory, scope=scope)
    made: list[AsyncSession] = []
    in_callback: list[bool] = []

    async def work() -> None:
        session = S()
        assert S() is session
        assert S.info is session.info
        made.append(session)
        await asyncio.sleep(0)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        original = CountingSession.close

        async def close(self: CountingSession) -> None:
            # closed by a task (the cleanup task), never inside a done-callback
            in_callback.append(asyncio.current_task() is None)
            await original(self)

        CountingSession.close = close  # type: ignore[method-assign]
        try:
            await asyncio.gather(*(work() for _ in range(1000)))
            # Self-cleaning, before any loop shutdown: a Context still held
            # when its task ends is polled (scoping.registry.POLL_INTERVAL).
            for _ in range(300):
                if not S.registry.pending() and not len(S.registry):
                    break
                await asyncio.sleep(0.01)
            assert len(S.registry) == 0
        finally:
            CountingSession.close = original  # type: ignore[method-assign]
        assert loop.is_running()

    asyncio.run(main())
    assert len(set(map(id, made))) == 1000
    assert len(S.registry) == 0
    assert S.registry.pending() == 0
    closes = collections.Counter(map(id, CountingSession.closed))
    assert {id(s): 1 for s in made} == closes
    assert in_callback
    assert not any(in_callback)


def test_loop_shutdown_closes_what_is_left(factory: async_sessionmaker[CountingSession]) -> None:
    """asyncio.run cancels pending tasks and shuts async generators down: all closed."""
    S = async_scoped_session(factory)
    made: list[AsyncSession] = []

    async def hang() -> None:
        made.append(S())
        await asyncio.sleep(3600)

    async def main() -> None:
        made.append(S())  # the main task's Session, never removed
        for _ in range(50):
            asyncio.create_task(hang())  # noqa: RUF006 - cancelled by asyncio.run
        await asyncio.sleep(0)

    asyncio.run(main())
    assert len(made) == 51
    assert len(S.registry) == 0
    assert S.registry.pending() == 0
    assert sorted(map(id, CountingSession.closed)) == sorted(map(id, made))


def test_remove_and_aclose_all(factory: async_sessionmaker[CountingSession]) -> None:
    S = async_scoped_session(factory)

    async def main() -> None:
        first = S()
        await S.remove()
        assert CountingSession.closed == [first]
        assert S() is not first
        await S.remove()
        await S.remove()  # nothing there: no-op
        S()
        assert await S.registry.aclose_all() == 1
        assert len(S.registry) == 0

    asyncio.run(main())
    assert len(CountingSession.closed) == 3


SCOPES_AND_SCOPEFUNCS: list[dict[str, t.Any]] = [
    {},  # "auto": the task
    {"scope": "contextvar"},
    {"scopefunc": asyncio.current_task},  # SQLAlchemy's own form
]


@pytest.mark.parametrize("kwargs", SCOPES_AND_SCOPEFUNCS, ids=["auto", "contextvar", "scopefunc"])
def test_a_task_that_makes_a_session_again_after_remove_is_still_cleaned_up(
    kwargs: dict[str, t.Any], factory: async_sessionmaker[CountingSession]
) -> None:
    # remove() takes back the task's done-callback where it can; a Session the
    # task makes afterwards, and forgets, must be watched again.
    S = async_scoped_session(factory, **kwargs)
    made: list[AsyncSession] = []

    async def work() -> None:
        made.append(S())
        await S.remove()
        made.append(S())  # forgotten

    async def main() -> None:
        await asyncio.create_task(work())
        for _ in range(300):  # contextvar: a held Context is polled
            if not len(S.registry) and not S.registry.pending():
                break
            await asyncio.sleep(0.01)
        assert len(S.registry) == 0

    asyncio.run(main())
    assert S.registry.pending() == 0
    assert sorted(map(id, CountingSession.closed)) == sorted(map(id, made))


def test_remove_takes_back_the_tasks_done_callback(
    factory: async_sessionmaker[CountingSession],
) -> None:
    S = async_scoped_session(factory)
    watched: list[bool] = []

    async def work() -> None:
        task = asyncio.current_task()
        S()
        watched.append(task in S.registry._watched)
        await S.remove()
        watched.append(task in S.registry._watched)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ran: list[object] = []
        original = S.registry._on_end

        class Spy:
            def __call__(self, key: object) -> None:
                ran.append(key)
                original(key)

        S.registry._on_end = Spy()  # type: ignore[assignment]
        await asyncio.create_task(work())
        await asyncio.sleep(0)
        assert ran == []  # the ended task cost the loop no callback
        assert loop.is_running()

    asyncio.run(main())
    assert watched == [True, False]
    assert len(CountingSession.closed) == 1


def test_the_loop_of_each_session_is_forgotten_with_it(
    factory: async_sessionmaker[CountingSession],
) -> None:
    S = async_scoped_session(factory)

    async def work() -> None:
        S()
        await S.remove()

    async def main() -> None:
        for _ in range(100):
            await asyncio.create_task(work())
        S()  # one left to the loop's shutdown

    for _ in range(2):  # a second loop after the first one closed
        CountingSession.closed = []
        asyncio.run(main())
        assert len(CountingSession.closed) == 101
        assert len(S.registry) == 0
    CountingSession.closed = []
    import gc

    gc.collect()
    assert len(S.registry._loop_of) == 0


# -- scope() --------------------------------------------------------------------


def test_scope_block_removes_on_exit_nested_and_once(
    factory: async_sessionmaker[CountingSession],
) -> None:
    S = async_scoped_session(factory)

    async def main() -> None:
        async with S.scope() as outer:
            async with S.scope() as inner:
                assert inner is outer is S()
            assert CountingSession.closed == []
        assert CountingSession.closed == [outer]
        assert len(S.registry) == 0
        block = S.scope()
        async with block:
            pass
        with pytest.raises(ScopeReentered, match="already entered"):
            async with block:
                pass
        with pytest.raises(TypeError, match="takes no token"):
            S.scope("t")
        with pytest.raises(KeyError):
            async with S.scope():
                raise KeyError("app error")
        assert len(S.registry) == 0
        assert len(CountingSession.closed) == 3

    asyncio.run(main())


def test_token_children_share_only_while_the_block_is_live(
    factory: async_sessionmaker[CountingSession],
) -> None:
    S = async_scoped_session(factory, scope="token")

    async def main() -> None:
        started = asyncio.Event()
        go_on = asyncio.Event()

        async def child() -> AsyncSession:
            inside = S()
            started.set()
            await go_on.wait()
            return inside

        async def late_child() -> None:
            await go_on.wait()
            await asyncio.sleep(0)
            S()  # the block that bound the token has exited by now

        async with S.scope("req-1") as parent:
            task = asyncio.create_task(child())
            late = asyncio.create_task(late_child())
            await started.wait()
        go_on.set()
        assert await task is parent
        with pytest.raises(ScopeEnded, match="has exited"):
            await late
        assert len(S.registry) == 0
        assert CountingSession.closed == [parent]
        with pytest.raises(NoScopeToken):
            S()

    asyncio.run(main())


def test_children_get_their_own_session_under_auto(
    factory: async_sessionmaker[CountingSession],
) -> None:
    S = async_scoped_session(factory)

    async def main() -> None:
        async with S.scope() as parent:
            child = await asyncio.create_task(asyncio.sleep(0, result=None)) or None
            kid = await asyncio.create_task(_make(S))
            assert kid is not parent
            assert child is None
        await asyncio.sleep(0.01)
        assert len(S.registry) == 0
        assert {id(s) for s in CountingSession.closed} == {
            id(parent),
            id(kid),
        }

    asyncio.run(main())


async def _make(S: async_scoped_session[t.Any]) -> AsyncSession:
    return S()


# -- guard ------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_guard_names_both_tasks(pg_url: str, driver: str) -> None:
    """gather-shared: one Session object used by gathered tasks."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def main() -> None:
        engine = create_async_engine(async_url(pg_url, driver))
        S = async_scoped_session(async_sessionmaker(engine), guard=True)
        asyncio.current_task().set_name("owner")  # type: ignore[union-attr]
        shared = S()
        await shared.execute(text("select 1"))

        async def use(name: str) -> None:
            asyncio.current_task().set_name(name)  # type: ignore[union-attr]
            await shared.execute(text("select 1"))

        results = await asyncio.gather(use("intruder-1"), use("intruder-2"), return_exceptions=True)
        assert all(isinstance(r, ScopeViolation) for r in results), results
        message = str(results[0])
        assert "asyncio task owner" in message
        assert "asyncio task intruder-1" in message
        await S.execute(text("select 1"))  # the owner still works
        await S.remove()
        assert engine.sync_engine.pool.checkedout() == 0
        await engine.dispose()

    asyncio.run(main())


def test_remove_releases_the_guard_of_a_guarded_session(
    factory: async_sessionmaker[CountingSession],
) -> None:
    from scoping.guard import SessionGuard

    async def main() -> None:
        for guard in (True, False):
            S = async_scoped_session(factory, guard=guard)
            session = S()
            await S.remove()
            held = session.sync_session.__dict__.get("_scoping_guard")
            assert (held is not None) is guard
            if held is not None:
                assert isinstance(held, SessionGuard)
                assert held.released  # closing it elsewhere is no violation

    asyncio.run(main())


# -- PostgreSQL: 10,000 tasks without remove(), cancel mid-query -----------------

CHILD = r"""
import asyncio, json, logging, os, sys, time, warnings

seen = []
warnings.simplefilter("error")
warnings.showwarning = lambda m, c, f, l, file=None, line=None: seen.append(f"warning: {m}")
sys.unraisablehook = lambda u: seen.append(f"unraisable: {u.exc_value!r} in {u.object!r}")


class Catch(logging.Handler):
    def emit(self, record):
        seen.append(f"log {record.name}: {record.getMessage()}")


logging.getLogger().addHandler(Catch(logging.WARNING))

import sqlalchemy
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from scoping.asyncio import async_scoped_session

cfg = json.loads(sys.stdin.read())
N, CANCEL_EVERY = cfg["n"], cfg["cancel_every"]
out = {}


async def main():
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _l, ctx: seen.append(f"loop: {ctx.get('message')}"))
    engine = create_async_engine(cfg["url"], pool_size=5, max_overflow=5, pool_timeout=60)
    S = async_scoped_session(async_sessionmaker(engine))

    async def work(i):
        await S.execute(text("select 1"))
        if i % CANCEL_EVERY == 0:
            # cancelled 50 ms into a 30 s statement: mid-query
            loop.call_later(0.05, asyncio.current_task().cancel)
            await S.execute(text("select pg_sleep(30) /* h6-cancel */"))

    tasks = []
    for i in range(N):
        tasks.append(asyncio.create_task(work(i)))
        if i % 100 == 0:
            await asyncio.sleep(0.01)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    out["cancelled"] = sum(isinstance(r, asyncio.CancelledError) for r in results)
    out["failed"] = [repr(r) for r in results if isinstance(r, Exception)][:5]
    ended = time.monotonic()
    while S.registry.pending() or len(S.registry) or engine.sync_engine.pool.checkedout():
        if time.monotonic() - ended > 60:
            break
        await asyncio.sleep(0.01)
    out["drain_s"] = round(time.monotonic() - ended, 3)
    out["registry"] = len(S.registry)
    out["pending"] = S.registry.pending()
    out["checkedout"] = engine.sync_engine.pool.checkedout()
    await asyncio.sleep(0.5)
    async with engine.connect() as conn:
        out["still_running"] = (await conn.execute(text(
            "select count(*) from pg_stat_activity where query like '%h6-cancel%' "
            "and state = 'active' and pid <> pg_backend_pid()"
        ))).scalar()
    await engine.dispose()


asyncio.run(main())
out["seen"] = seen
print(json.dumps(out))
"""


def run_tasks(pg_url: str, driver: str, n: int, cancel_every: int) -> dict[str, t.Any]:
    cfg = {"url": async_url(pg_url, driver), "n": n, "cancel_every": cancel_every}
    # the DSN goes on stdin, never in argv
    result: dict[str, t.Any] = run_json(
        ["-W", "error", "-c", CHILD], stdin=json.dumps(cfg), timeout=600
    )
    return result


def check_clean(result: dict[str, t.Any], n: int, cancel_every: int) -> None:
    assert result["seen"] == []
    assert result["failed"] == []
    assert result["cancelled"] == len(range(0, n, cancel_every))
    assert result["registry"] == 0
    assert result["pending"] == 0
    assert result["checkedout"] == 0
    assert result["still_running"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("driver", DRIVERS)
def test_tasks_without_remove_postgres(pg_url: str, driver: str) -> None:
    result = run_tasks(pg_url, driver, n=500, cancel_every=50)
    check_clean(result, 500, 50)


@pytest.mark.slow
@pytest.mark.parametrize("driver", DRIVERS)
def test_ten_thousand_tasks_without_remove_postgres(pg_url: str, driver: str) -> None:
    result = run_tasks(pg_url, driver, n=10_000, cancel_every=100)
    check_clean(result, 10_000, 100)


# -- the hot path's key is the strategy's key --------------------------------------


@pytest.mark.parametrize("scope", ["auto", "contextvar", "token"])
def test_fast_key_equals_strategy_current(
    scope: str, factory: async_sessionmaker[CountingSession]
) -> None:
    S = async_scoped_session(factory, scope=scope)

    async def check() -> None:
        assert S._current() == S.strategy.current()
        assert S() is S.registry.registry[S.strategy.current()]

    async def main() -> None:
        if scope == "token":
            async with S.scope("t"):
                await asyncio.gather(check(), asyncio.create_task(check()))
        else:
            await asyncio.gather(check(), asyncio.create_task(check()))
            await check()
        await S.registry.aclose_all()

    asyncio.run(main())
    if scope != "token":
        # Outside any loop the fast key misses (or raises) and the strategy decides.
        session = S()
        assert S.registry.registry[S.strategy.current()] is session
        S.registry.registry.clear()
