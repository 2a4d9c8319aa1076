"""Parity with the installed SQLAlchemy's ``scoped_session``, for every strategy."""

from __future__ import annotations

import inspect
import typing as t
import warnings

import pytest
import sqlalchemy
from sqlalchemy import ForeignKey, Integer, String, create_engine, select, text
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.orm import scoped_session as sa_scoped_session

import scoping

STRATEGIES = ["thread", "greenlet", "contextvar", "token", "auto"]
SA_VERSION = tuple(int(p) for p in sqlalchemy.__version__.split(".")[:2])

# Our additions, deliberately not on SQLAlchemy's class.
OURS_ONLY = {"scope", "strategy", "guard", "dispose_engines"}


def public_names(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")} | {"__call__", "__contains__", "__iter__"}


def shape(func: t.Any) -> list[tuple[str, t.Any, t.Any]]:
    """Names, kinds and defaults (annotations differ only in spelling)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values()]


def test_every_public_name_is_there_with_the_same_signature() -> None:
    ours, theirs = scoping.scoped_session, sa_scoped_session
    assert issubclass(ours, theirs)
    missing = public_names(theirs) - public_names(ours)
    assert not missing
    extra = {n for n in public_names(ours) - public_names(theirs)} - OURS_ONLY
    assert not extra
    for name in sorted(public_names(theirs)):
        if name == "__init__":
            continue
        mine, sa = inspect.getattr_static(ours, name), inspect.getattr_static(theirs, name)
        if callable(sa) or isinstance(sa, (classmethod, staticmethod)):
            func_sa = getattr(theirs, name)
            func_mine = getattr(ours, name)
            assert shape(func_mine) == shape(func_sa), name
        else:
            assert type(mine) is type(sa), name


def test_init_accepts_sqlalchemys_parameters() -> None:
    sa_params = list(inspect.signature(sa_scoped_session.__init__).parameters)
    our_params = list(inspect.signature(scoping.scoped_session.__init__).parameters)
    assert our_params[: len(sa_params)] == sa_params
    extra = inspect.signature(scoping.scoped_session.__init__).parameters
    assert all(
        extra[p].kind is inspect.Parameter.KEYWORD_ONLY for p in our_params[len(sa_params) :]
    )


def test_version_specific_surface() -> None:
    """The 2.0 / 2.1 differences come from SQLAlchemy itself."""
    names = public_names(scoping.scoped_session)
    if SA_VERSION >= (2, 1):
        assert {"delete_all", "merge_all", "execution_options", "binds"} <= names
        assert "close_all" not in names
    else:
        assert "close_all" in names


class Base(DeclarativeBase):
    pass


class Parent(Base):
    __tablename__ = "parent"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    children: Mapped[list[Child]] = relationship(back_populates="parent")


class Child(Base):
    __tablename__ = "child"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("parent.id"))
    parent: Mapped[Parent] = relationship(back_populates="children")


@pytest.fixture(params=STRATEGIES)
def S(request: pytest.FixtureRequest) -> t.Iterator[scoping.scoped_session[Session]]:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    session = scoping.scoped_session(sessionmaker(bind=engine), scope=request.param)
    if request.param == "token":
        with session.scope("the-token"):
            yield session
    else:
        yield session
        session.remove()
    engine.dispose()


def test_add_commit_rollback(S: scoping.scoped_session[Session]) -> None:
    S.add(Parent(id=1, name="a"))
    S.commit()
    S.add(Parent(id=2, name="b"))
    S.rollback()
    assert S.scalars(select(Parent.name)).all() == ["a"]
    assert S.execute(text("select count(*) from parent")).scalar() == 1
    assert S.scalar(select(Parent.name).where(Parent.id == 1)) == "a"
    assert S.get(Parent, 1) is S.get_one(Parent, 1)
    assert S.get(Parent, 1) in S
    assert S.object_session(S.get(Parent, 1)) is S()


def test_info_identity_map_new_dirty(S: scoping.scoped_session[Session]) -> None:
    S.info["k"] = "v"
    assert S().info == {"k": "v"}
    p = Parent(id=3, name="c")
    S.add(p)
    assert p in S.new
    S.flush()
    assert S.identity_map.get(S.identity_key(Parent, 3)) is p
    p.name = "d"
    assert p in S.dirty
    S.delete(p)
    S.flush()
    assert p in S.deleted or S.get(Parent, 3) is None


def test_query_property_and_no_autoflush(S: scoping.scoped_session[Session]) -> None:
    class OwnBase(DeclarativeBase):
        pass

    class Q(OwnBase):
        __tablename__ = "q"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        query = S.query_property()

    Q.__table__.create(S.get_bind())
    S.add(Q(id=1))
    with S.no_autoflush:
        assert Q.query.count() == 0
    assert Q.query.count() == 1


def test_begin_nested(S: scoping.scoped_session[Session]) -> None:
    S.add(Parent(id=10, name="outer"))
    with S.begin_nested():
        S.add(Parent(id=11, name="inner"))
    nested = S.begin_nested()
    S.add(Parent(id=12, name="rolled back"))
    nested.rollback()
    S.commit()
    assert sorted(S.scalars(select(Parent.id)).all()) == [10, 11]


def test_call_remove_and_configure(S: scoping.scoped_session[Session]) -> None:
    first = S()
    assert S() is first
    assert S.registry.has()
    S.remove()
    assert not S.registry.has()
    second = S()
    assert second is not first
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        S.configure(expire_on_commit=False)
    assert any("configure() can not affect" in str(w.message) for w in caught)


# -- scoping.asyncio.async_scoped_session against SQLAlchemy's ------------------

ASYNC_OURS_ONLY = {"scope", "strategy", "guard", "dispose_engines"}


def test_async_every_public_name_is_there_with_the_same_signature() -> None:
    from sqlalchemy.ext.asyncio import async_scoped_session as sa_async

    from scoping.asyncio import async_scoped_session as ours

    assert issubclass(ours, sa_async)
    assert not public_names(sa_async) - public_names(ours)
    assert not public_names(ours) - public_names(sa_async) - ASYNC_OURS_ONLY
    for name in sorted(public_names(sa_async)):
        if name == "__init__":
            continue
        mine, sa = inspect.getattr_static(ours, name), inspect.getattr_static(sa_async, name)
        if callable(sa) or isinstance(sa, (classmethod, staticmethod)):
            func_mine, func_sa = getattr(ours, name), getattr(sa_async, name)
            assert shape(func_mine) == shape(func_sa), name
            assert inspect.iscoroutinefunction(func_mine) == inspect.iscoroutinefunction(func_sa), (
                name
            )
        else:
            assert type(mine) is type(sa), name


def test_async_init_accepts_sqlalchemys_parameters() -> None:
    from sqlalchemy.ext.asyncio import async_scoped_session as sa_async

    from scoping.asyncio import async_scoped_session as ours

    sa_params = list(inspect.signature(sa_async.__init__).parameters)
    params = inspect.signature(ours.__init__).parameters
    assert list(params)[: len(sa_params)] == sa_params
    assert all(
        params[p].kind is inspect.Parameter.KEYWORD_ONLY for p in list(params)[len(sa_params) :]
    )


def test_async_version_specific_surface() -> None:
    """The 2.0 / 2.1 differences come from SQLAlchemy itself."""
    from sqlalchemy.ext.asyncio import async_scoped_session as sa_async

    from scoping.asyncio import async_scoped_session as ours

    names = public_names(ours)
    if SA_VERSION >= (2, 1):
        assert {"delete_all", "merge_all", "execution_options", "binds"} <= names
    assert ("close_all" in names) == ("close_all" in public_names(sa_async))
