"""guard=True: a Session used outside the scope that owns it raises, every time."""

from __future__ import annotations

import threading
import typing as t

import greenlet
import pytest
from sqlalchemy import Integer, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import scoping
from scoping.guard import describe_scope
from tests._subproc import run_python

ATTEMPTS = 50


@pytest.fixture
def factory() -> t.Iterator[sessionmaker[Session]]:
    engine = create_engine("sqlite://")
    yield sessionmaker(bind=engine)
    engine.dispose()


@pytest.mark.parametrize("strategy", ["thread", "greenlet", "contextvar", "auto"])
def test_session_handed_to_threads_is_caught_every_time(
    strategy: str, factory: sessionmaker[Session]
) -> None:
    S = scoping.scoped_session(factory, scope=strategy, guard=True)
    shared = S()
    caught: list[str] = []
    leaked: list[int] = []

    def misuse() -> None:
        try:
            shared.execute(text("select 1"))
            leaked.append(1)
        except scoping.ScopeViolation as exc:
            caught.append(str(exc))

    for _ in range(ATTEMPTS):
        th = threading.Thread(target=misuse)
        th.start()
        th.join()
    assert len(caught) == ATTEMPTS
    assert leaked == []
    assert "was used (begin)" in caught[0] or "was used (execute)" in caught[0]
    assert "greenlet" in caught[0]
    assert "call the scoped_session proxy" in caught[0]
    # The owner itself is not bothered.
    assert S.execute(text("select 1")).scalar() == 1


@pytest.mark.parametrize("strategy", ["greenlet", "contextvar", "auto"])
def test_session_handed_to_raw_greenlets_is_caught(
    strategy: str, factory: sessionmaker[Session]
) -> None:
    S = scoping.scoped_session(factory, scope=strategy, guard=True)
    shared = S()
    caught = 0

    def misuse() -> None:
        nonlocal caught
        try:
            shared.execute(text("select 1"))
        except scoping.ScopeViolation:
            caught += 1

    for _ in range(ATTEMPTS):
        greenlet.greenlet(misuse).switch()
    assert caught == ATTEMPTS


def test_flush_from_another_scope_is_caught(factory: sessionmaker[Session]) -> None:
    class Base(DeclarativeBase):
        pass

    class Row(Base):
        __tablename__ = "rows"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)

    Base.metadata.create_all(factory.kw["bind"])
    S = scoping.scoped_session(factory, scope="greenlet", guard=True)
    shared = S()
    shared.add(Row())  # pending work, so that flush() really flushes
    errors: list[scoping.ScopeViolation] = []

    def misuse() -> None:
        try:
            shared.flush()
        except scoping.ScopeViolation as exc:
            errors.append(exc)

    greenlet.greenlet(misuse).switch()
    assert len(errors) == 1
    assert "(flush)" in str(errors[0])
    assert shared.new  # nothing was flushed


def test_correct_use_is_never_flagged(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope="greenlet", guard=True)
    results: list[int] = []

    def work() -> None:
        with S.scope():
            results.append(S.execute(text("select 1")).scalar_one())
            S.commit()

    threads = [threading.Thread(target=work) for _ in range(10)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for _ in range(10):
        greenlet.greenlet(work).switch()
    assert results == [1] * 20


def test_guard_with_call_kwargs(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope="greenlet", guard=True)
    shared = S(autoflush=False)
    caught = []

    def misuse() -> None:
        try:
            shared.execute(text("select 1"))
        except scoping.ScopeViolation:
            caught.append(1)

    greenlet.greenlet(misuse).switch()
    assert caught == [1]


class _Base(DeclarativeBase):
    pass


class Row(_Base):
    __tablename__ = "guard_rows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)


def test_shared_token_touched_while_another_has_writes_is_caught(
    factory: sessionmaker[Session],
) -> None:
    _Base.metadata.create_all(factory.kw["bind"])
    S = scoping.scoped_session(factory, scope="token", guard=True)
    main = greenlet.getcurrent()
    caught: list[str] = []

    def first() -> None:
        with S.scope("shared"):
            S.add(Row())
            S.flush()  # a transaction with writes
            main.switch()  # ... still open while the other runs
            S.commit()

    def second() -> None:
        with S.scope("shared"):
            try:
                S.execute(text("select 2"))
            except scoping.ScopeViolation as exc:
                caught.append(str(exc))

    a = greenlet.greenlet(first)
    a.switch()
    greenlet.greenlet(second).switch()
    a.switch()
    assert len(caught) == 1
    assert "has a transaction open on it with writes" in caught[0]

    # Taking turns is allowed: commit, then the other greenlet goes.
    def turn() -> None:
        with S.scope("shared"):
            S.execute(text("select 1"))
            S.commit()

    for _ in range(3):
        greenlet.greenlet(turn).switch()


def test_token_session_used_outside_any_scope(factory: sessionmaker[Session]) -> None:
    S = scoping.scoped_session(factory, scope="token", guard=True)
    with S.scope("a") as session:
        pass
    with pytest.raises(scoping.ScopeViolation, match="outside any scope"):
        session.execute(text("select 1"))


def test_describe_scope() -> None:
    assert describe_scope("abc") == "token 'abc'"
    assert describe_scope(greenlet.getcurrent()).startswith("greenlet ")


def test_gevent_shared_session_caught_on_first_use() -> None:
    code = f"""
        from gevent import monkey; monkey.patch_all()
        import json, gevent, scoping
        from sqlalchemy import create_engine, text
        from sqlalchemy.orm import sessionmaker
        S = scoping.scoped_session(
            sessionmaker(bind=create_engine("sqlite://")), scope="greenlet", guard=True)
        shared = S()
        caught, ran = [], []
        def misuse():
            try:
                shared.execute(text("select 1"))
                ran.append(1)
            except scoping.ScopeViolation as exc:
                caught.append(str(exc))
        gevent.joinall([gevent.spawn(misuse) for _ in range({ATTEMPTS})])
        ok = []
        def proper():
            ok.append(S.execute(text("select 1")).scalar_one())
            S.remove()
        gevent.joinall([gevent.spawn(proper) for _ in range({ATTEMPTS})])
        print(json.dumps({{"caught": len(caught), "ran": len(ran), "ok": len(ok),
                           "names_greenlet": "Greenlet" in caught[0]}}))
    """
    assert run_python(code) == {
        "caught": ATTEMPTS,
        "ran": 0,
        "ok": ATTEMPTS,
        "names_greenlet": True,
    }
