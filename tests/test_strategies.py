"""One behaviour, every strategy, every runtime.

Each unit of work (thread, raw greenlet, asyncio task) takes the proxy's
Session, adds an object tagged with its own number, lets every other unit run,
then checks it still has the same Session and sees only its own objects. The
expected outcome of every strategy in every runtime is stated in EXPECTED;
the counts are exact. gevent runtimes run in subprocesses (test_gevent.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import typing as t

import greenlet
import pytest
from sqlalchemy import Integer, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import scoping

N = 12
STRATEGIES = ["thread", "greenlet", "contextvar", "token", "auto"]
RUNTIMES = ["threads", "raw-greenlets", "copied-context-greenlets", "asyncio-tasks"]

# True: every unit has its own Session. False: all units share one Session,
# which is what the strategy's definition says for that runtime.
EXPECTED: dict[tuple[str, str], bool] = {
    ("thread", "threads"): True,
    ("thread", "raw-greenlets"): False,  # one OS thread: threading is not patched
    ("thread", "copied-context-greenlets"): False,
    ("thread", "asyncio-tasks"): False,  # tasks share their thread
    ("greenlet", "threads"): True,
    ("greenlet", "raw-greenlets"): True,
    ("greenlet", "copied-context-greenlets"): True,
    ("greenlet", "asyncio-tasks"): False,  # tasks share the loop's greenlet
    ("contextvar", "threads"): True,
    ("contextvar", "raw-greenlets"): True,
    ("contextvar", "copied-context-greenlets"): True,  # a copy never shares
    ("contextvar", "asyncio-tasks"): True,
    ("token", "threads"): True,
    ("token", "raw-greenlets"): True,
    ("token", "copied-context-greenlets"): True,
    ("token", "asyncio-tasks"): True,
    ("auto", "threads"): True,
    ("auto", "raw-greenlets"): True,
    ("auto", "copied-context-greenlets"): True,
    ("auto", "asyncio-tasks"): True,
}


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tag: Mapped[int] = mapped_column(Integer)


class CountingSession(Session):
    closed: t.ClassVar[int] = 0

    def close(self) -> None:
        type(self).closed += 1  # one subclass per test: the reaper thread may close late
        super().close()


Observation = tuple[int, int, bool, list[int]]


def unit_of_work(
    S: scoping.scoped_session[CountingSession], i: int, out: list[Observation]
) -> t.Iterator[None]:
    """A generator: each ``yield`` lets every other unit run."""
    scope = S.scope(f"request-{i}") if S.strategy.name == "token" else contextlib.nullcontext()
    with scope:
        first = S()
        S.add(Item(tag=i))
        yield
        second = S()
        tags = sorted(obj.tag for obj in S.new if isinstance(obj, Item))
        out.append((i, id(first), first is second, tags))
        yield
        if S.strategy.name != "token":
            S.expunge_all()  # forget the pending rows; leave the Session to cleanup


def drive_threads(S: t.Any, out: list[Observation]) -> None:
    barrier = threading.Barrier(N)

    def run(i: int) -> None:
        for _ in unit_of_work(S, i, out):
            barrier.wait(timeout=10)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=10)


def drive_greenlets(S: t.Any, out: list[Observation], copy_context: bool = False) -> None:
    main = greenlet.getcurrent()

    def run(i: int) -> None:
        for _ in unit_of_work(S, i, out):
            main.switch()

    glets = [greenlet.greenlet(run) for i in range(N)]
    token = S.strategy.name == "token"
    parent_scope = S.scope("parent") if copy_context and token else contextlib.nullcontext()
    with parent_scope:
        if copy_context:
            parent = S()  # the parent holds a Session, then its children copy its context
            for g in glets:
                g.gr_context = contextvars.copy_context()
        # Round robin: every greenlet reaches each yield before any goes further.
        for step in range(3):
            for i, g in enumerate(glets):
                if not g.dead:
                    g.switch(i) if step == 0 else g.switch()
        assert all(g.dead for g in glets)
        if copy_context and EXPECTED[(S.strategy.name, "copied-context-greenlets")]:
            assert id(parent) not in {session_id for _, session_id, _, _ in out}


def drive_asyncio(S: t.Any, out: list[Observation]) -> None:
    async def run(i: int) -> None:
        for _ in unit_of_work(S, i, out):
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(*(asyncio.create_task(run(i)) for i in range(N)))

    asyncio.run(main())


def drive(runtime: str, S: t.Any, out: list[Observation]) -> None:
    if runtime == "threads":
        drive_threads(S, out)
    elif runtime == "raw-greenlets":
        drive_greenlets(S, out)
    elif runtime == "copied-context-greenlets":
        drive_greenlets(S, out, copy_context=True)
    else:
        drive_asyncio(S, out)


@pytest.fixture
def session_factory() -> t.Iterator[sessionmaker[CountingSession]]:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    # A class of its own per test: Sessions retired by earlier tests may be
    # closed by the reaper thread while this one runs.
    counting = type("CountingSession", (CountingSession,), {"closed": 0})
    yield sessionmaker(bind=engine, class_=counting)
    engine.dispose()


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_isolation(
    strategy: str, runtime: str, session_factory: sessionmaker[CountingSession]
) -> None:
    S = scoping.scoped_session(session_factory, scope=strategy)
    out: list[Observation] = []
    drive(runtime, S, out)

    assert len(out) == N
    sessions = {session_id for _, session_id, _, _ in out}
    same_session_throughout = all(stable for _, _, stable, _ in out)
    if EXPECTED[(strategy, runtime)]:
        assert len(sessions) == N, "every unit must get its own Session"
        assert same_session_throughout
        assert [tags for *_, tags in sorted(out)] == [[i] for i in range(N)]
    else:
        assert len(sessions) == 1, "by definition this strategy shares one Session here"
        assert [tags for *_, tags in out] == [list(range(N))] * N


@pytest.mark.parametrize("runtime", ["threads", "raw-greenlets", "asyncio-tasks"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forgotten_remove_is_cleaned_up(
    strategy: str, runtime: str, session_factory: sessionmaker[CountingSession]
) -> None:
    """Units end without remove(): after collect() nothing of theirs is left."""
    S = scoping.scoped_session(session_factory, scope=strategy)
    out: list[Observation] = []
    drive(runtime, S, out)
    S.registry.collect()
    isolated = EXPECTED[(strategy, runtime)]
    if isolated:
        assert len(S.registry) == 0
        assert session_factory.class_.closed == N
    else:
        # The shared Session belongs to the main thread, which is still alive.
        assert len(S.registry) == 1
        assert session_factory.class_.closed == 0


def test_threads_end_is_noticed_when_new_sessions_are_created(
    session_factory: sessionmaker[CountingSession],
) -> None:
    """No explicit collect(): creating Sessions sweeps the dead threads."""
    S = scoping.scoped_session(session_factory, scope="thread")
    for _ in range(200):
        th = threading.Thread(target=S)
        th.start()
        th.join()
    assert len(S.registry) <= 64  # the sweep runs at least every 64 creations
    S()
    S.registry.collect()
    assert len(S.registry) == 1  # only the main thread's Session
    assert session_factory.class_.closed == 200


def test_raw_greenlets_cleanup_is_bounded(session_factory: sessionmaker[CountingSession]) -> None:
    S = scoping.scoped_session(session_factory, scope="greenlet")
    peak = 0
    for _ in range(5000):
        greenlet.greenlet(S).switch()
        peak = max(peak, len(S.registry))
    assert peak <= 65
    S.registry.collect()
    assert len(S.registry) == 0
    assert session_factory.class_.closed == 5000


def test_contextvar_run_same_context_shares_session(
    session_factory: sessionmaker[CountingSession],
) -> None:
    S = scoping.scoped_session(session_factory, scope="contextvar")
    ctx = contextvars.copy_context()
    first = ctx.run(S)
    assert ctx.run(S) is first
    assert S() is not first
    assert contextvars.copy_context().run(S) is not S()


def test_contextvar_session_closed_when_context_is_freed(
    session_factory: sessionmaker[CountingSession],
) -> None:
    S = scoping.scoped_session(session_factory, scope="contextvar")
    for _ in range(10):
        contextvars.copy_context().run(S)  # each context is freed right away
    assert len(S.registry) == 0
    S.registry.collect()
    assert session_factory.class_.closed == 10


def test_contextvar_many_contexts_in_one_thread_leave_nothing_behind(
    session_factory: sessionmaker[CountingSession],
) -> None:
    from scoping import _units

    S = scoping.scoped_session(session_factory, scope="contextvar")
    S()  # the thread's own context
    callbacks_before = _units.thread_exit_callbacks()
    for _ in range(2000):
        contextvars.copy_context().run(S)
    S.registry.collect()
    assert len(S.registry) == 1
    assert session_factory.class_.closed == 2000
    assert len(S.registry._watched) == 1
    assert len(S.strategy._refs) == 1  # type: ignore[attr-defined]
    callbacks_after = _units.thread_exit_callbacks()
    assert callbacks_after == callbacks_before


def test_auto_is_decided_at_use_time(session_factory: sessionmaker[CountingSession]) -> None:
    S = scoping.scoped_session(session_factory)  # auto is the default
    assert S.strategy.name == "auto"
    outside = S()

    async def in_task() -> Session:
        return S()

    async def main() -> tuple[Session, Session]:
        return await asyncio.create_task(in_task()), await asyncio.create_task(in_task())

    a, b = asyncio.run(main())
    assert a is not b
    assert outside not in (a, b)
    assert S() is outside


def test_thread_strategy_follows_threading_local_replacement(
    session_factory: sessionmaker[CountingSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a swap of threading.local makes the thread strategy re-decide."""
    S = scoping.scoped_session(session_factory, scope="thread")
    first = S()

    made: list[object] = []

    class FakeLocal(threading.local):
        def __init__(self) -> None:
            made.append(self)

    monkeypatch.setattr(threading, "local", FakeLocal)
    assert S() is first  # a hit: the running greenlet is this thread's key
    key = S.strategy.current()  # the strategy re-decides with the new class ...
    assert len(made) == 1
    assert S.registry.registry[key] is first  # ... and keeps the same key
    S.strategy.current()
    assert len(made) == 1  # once per replacement, not per call


@pytest.mark.postgres
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_threads_on_postgres(strategy: str, pg_engine: t.Any) -> None:
    """The same behaviour with real I/O: threads insert, flush, read back and commit."""
    from sqlalchemy import select, text

    table = f"threads_{strategy}"
    with pg_engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        conn.execute(text(f"CREATE TABLE {table} (id serial primary key, tag int)"))

    class OwnBase(DeclarativeBase):
        pass

    class Tagged(OwnBase):
        __tablename__ = table
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        tag: Mapped[int] = mapped_column(Integer)

    S = scoping.scoped_session(sessionmaker(bind=pg_engine), scope=strategy)
    barrier = threading.Barrier(5)
    foreign: list[int] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        token = S.scope(i) if strategy == "token" else S.scope()
        try:
            with token:
                S.add_all([Tagged(tag=i) for _ in range(3)])
                S.flush()
                barrier.wait(timeout=20)  # every thread is mid-transaction now
                rows = S.scalars(select(Tagged).where(Tagged.tag == i)).all()
                foreign.extend(o.tag for o in S.identity_map.values() if o.tag != i)
                assert len(rows) == 3
                S.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert errors == []
    assert foreign == []
    with pg_engine.connect() as conn:
        counts = dict(conn.execute(text(f"select tag, count(*) from {table} group by tag")).all())
        conn.execute(text(f"DROP TABLE {table}"))
        conn.commit()
    assert counts == {i: 3 for i in range(5)}
    assert len(S.registry) == 0
    assert pg_engine.pool.checkedout() == 0
