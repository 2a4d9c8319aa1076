"""The application under test: one "request" is a realistic unit of work.

A request takes the Session of its scope, adds rows tagged with its request id,
yields on database I/O, flushes, reads its rows back, commits, then touches a
committed object (as rendering a response does: a refresh that opens a new
transaction and holds a connection until ``remove()``). A planned share of
requests raise after their flush, are interrupted mid-statement, or never call
``remove()``. Everything a request sees goes into its :class:`Record`.

The runtime (gevent, raw greenlets) and the database (PostgreSQL, SQLite) are
plugged in through :class:`Hooks`, so the same code runs in every cell and in
the unit tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import random
import time
import typing as t

from sqlalchemy import BigInteger, Integer, String, Text, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

if t.TYPE_CHECKING:
    import contextvars

from .detectors import (
    ERROR,
    FAILED,
    KILLED,
    OK,
    OWNER,
    TIMEOUT,
    Record,
    foreign_objects,
    stale_state,
)

# Plans: what a request is told to do.
P_OK = "ok"
P_FAIL = "fail"
P_FORGET = "forget"
P_TIMEOUT = "timeout"
P_KILL = "kill"


class InjectedFailure(Exception):
    """The planned failure of a request (raised after its rows are flushed)."""


def make_model(table: str) -> type[t.Any]:
    """A mapped class for the cell's table (one table per cell)."""

    class Base(DeclarativeBase):
        pass

    class Row(Base):
        __tablename__ = table
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        request_id: Mapped[str] = mapped_column(String(64))
        payload: Mapped[str] = mapped_column(Text)

    return Row


def create_table_sql(table: str, dialect: str) -> list[str]:
    """DDL for a cell's table; on PostgreSQL each row records its inserting transaction."""
    if dialect == "postgresql":
        return [
            f"CREATE TABLE {table} (id serial PRIMARY KEY, request_id varchar(64) NOT NULL, "
            f"payload text, xact bigint NOT NULL DEFAULT txid_current())"
        ]
    return [
        f"CREATE TABLE {table} (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        f"request_id VARCHAR(64) NOT NULL, payload TEXT, xact BIGINT)"
    ]


_ = BigInteger  # the xact column is not mapped: the server fills it


def iter_plans(seed: int, scenario: str, mix: t.Mapping[str, float]) -> t.Iterator[str]:
    """The seeded plan of each request: same seed and scenario, same plans, any setup."""
    rng = random.Random(f"{seed}:{scenario}")
    order = [(p, mix.get(p, 0.0)) for p in (P_FAIL, P_FORGET, P_TIMEOUT, P_KILL)]
    while True:
        x = rng.random()
        plan = P_OK
        for name, share in order:
            if x < share:
                plan = name
                break
            x -= share
        yield plan


def make_plans(n: int, seed: int, scenario: str, mix: t.Mapping[str, float]) -> list[str]:
    """The first ``n`` plans of :func:`iter_plans`."""
    return list(itertools.islice(iter_plans(seed, scenario, mix), n))


class Setup(t.Protocol):
    """How the app gets and drops its Session: a naive registry or a scoping strategy."""

    name: str

    def session(self) -> Session: ...

    def remove(self) -> None: ...

    def scope(self, rid: str) -> t.ContextManager[t.Any]: ...

    def registry_size(self) -> int | None: ...


@dataclasses.dataclass
class SAScoped:
    """SQLAlchemy's own ``scoped_session`` (the naive baselines).

    With ``token_var`` (a registry keyed by ``token_var.get``), :meth:`scope`
    sets the token for the block and resets it on exit, as a hand-written
    token middleware does.
    """

    name: str
    proxy: t.Any  # sqlalchemy.orm.scoped_session
    token_var: contextvars.ContextVar[str] | None = None

    def session(self) -> Session:
        return t.cast(Session, self.proxy())

    def remove(self) -> None:
        self.proxy.remove()

    def scope(self, rid: str) -> t.ContextManager[t.Any]:
        if self.token_var is None:
            return contextlib.nullcontext()
        return _token_block(self.token_var, rid)

    def registry_size(self) -> int | None:
        reg = getattr(self.proxy.registry, "registry", None)
        # ScopedRegistry keeps a dict we can count; ThreadLocalRegistry's
        # thread-local (a gevent local after patching) cannot be counted.
        return len(reg) if isinstance(reg, dict) else None


@contextlib.contextmanager
def _token_block(var: contextvars.ContextVar[str], token: str) -> t.Iterator[None]:
    reset = var.set(token)
    try:
        yield
    finally:
        var.reset(reset)


@dataclasses.dataclass
class Scoped:
    """A ``scoping.scoped_session`` with one strategy."""

    name: str
    proxy: t.Any  # scoping.scoped_session

    def session(self) -> Session:
        return t.cast(Session, self.proxy())

    def remove(self) -> None:
        self.proxy.remove()

    def scope(self, rid: str) -> t.ContextManager[t.Any]:
        if self.name == "token":
            return t.cast(t.ContextManager[t.Any], self.proxy.scope(rid))
        return contextlib.nullcontext()

    def registry_size(self) -> int | None:
        return len(self.proxy.registry)


@dataclasses.dataclass
class Hooks:
    """Runtime and database specifics."""

    io: t.Callable[[Session], None]  # one round trip that yields to other greenlets
    io_in_transaction: bool  # also yield while the flushed rows are uncommitted
    xact: t.Callable[[Session], int | None]  # the id of the transaction about to commit
    long_statement: t.Callable[[Session, str], None] | None = None
    timeout: t.Callable[[], t.ContextManager[t.Any]] | None = None
    interrupt_kind: t.Callable[[BaseException], str | None] = lambda e: None
    on_long_statement: t.Callable[[str], None] = lambda rid: None
    fail_before_flush: bool = False  # the planned failure comes before the flush
    pause: t.Callable[[], None] = lambda: None  # an explicit yield before the first statement


def postgres_hooks(tag: str, long_seconds: float) -> Hooks:
    def io(s: Session) -> None:
        s.execute(text("SELECT pg_sleep(0.001)"))

    def xact(s: Session) -> int | None:
        return int(s.execute(text("SELECT txid_current()")).scalar_one())

    def long_statement(s: Session, rid: str) -> None:
        s.execute(text(f"SELECT pg_sleep({long_seconds:.3f}) /* stress-req {tag} {rid} */"))

    return Hooks(io=io, io_in_transaction=True, xact=xact, long_statement=long_statement)


def sqlite_hooks(sleep0: t.Callable[[], None]) -> Hooks:
    """SQLite: one writer at a time and a driver that blocks the hub.

    Requests yield only while they hold no write lock (before the autoflush of
    their first statement), and the planned failure comes before the flush, so
    a failed request leaves pending objects behind, never a held write lock.
    """

    def io(s: Session) -> None:
        s.execute(text("SELECT 1"))

    return Hooks(
        io=io,
        io_in_transaction=False,
        xact=lambda s: None,
        fail_before_flush=True,
        pause=sleep0,  # sqlite3 never yields by itself
    )


@dataclasses.dataclass
class App:
    setup: Setup
    model: type[t.Any]
    hooks: Hooks
    rows: int = 3
    forget_on_error: bool = False
    #: False: the request never calls remove() itself (middleware does, elsewhere).
    removes: bool = True
    #: Called inside the request's scope block, after its remove(): where a
    #: request starts background work (the orphan-task scenario).
    in_block: t.Callable[[Record], None] | None = None


def _error(rec: Record, exc: BaseException) -> None:
    if rec.outcome == ERROR and rec.exc:
        return  # keep the first error
    rec.outcome = ERROR
    rec.exc = type(exc).__name__
    lines = [
        line
        for line in str(exc).strip().splitlines()
        if line.strip() and not line.startswith("(raised as a result of")
    ]
    rec.message = (lines or [""])[0][:300]


def _check(app: App, s: Session, rec: Record) -> None:
    rec.leaked = max(rec.leaked, foreign_objects(s, rec.rid))


def unit_of_work(app: App, rec: Record) -> None:
    s = app.setup.session()
    rec.stale = stale_state(s)
    objs = [app.model(request_id=rec.rid, payload=f"{rec.rid}/{i}") for i in range(app.rows)]
    for obj in objs:
        setattr(obj, OWNER, rec.rid)
    s.add_all(objs)
    _check(app, s, rec)
    app.hooks.pause()
    if rec.plan == P_FAIL and app.hooks.fail_before_flush:
        raise InjectedFailure(f"request {rec.rid} failed before its flush")
    app.hooks.io(s)
    _check(app, s, rec)
    s.flush()
    if app.hooks.io_in_transaction:
        app.hooks.io(s)
    _check(app, s, rec)
    rec.readback = len(s.scalars(select(app.model.id).where(app.model.request_id == rec.rid)).all())
    _check(app, s, rec)
    if rec.plan == P_FAIL:
        raise InjectedFailure(f"request {rec.rid} failed after its flush")
    if rec.plan in (P_TIMEOUT, P_KILL):
        assert app.hooks.long_statement is not None
        app.hooks.on_long_statement(rec.rid)
        if rec.plan == P_TIMEOUT:
            assert app.hooks.timeout is not None
            with app.hooks.timeout():
                app.hooks.long_statement(s, rec.rid)
        else:
            app.hooks.long_statement(s, rec.rid)
    rec.xact = app.hooks.xact(s)
    s.commit()
    rec.committed = True
    _ = objs[0].id  # like rendering a response: refreshes, opens a new transaction


def handle(app: App, rid: str, plan: str = P_OK, token: str | None = None) -> Record:
    """Run one request the way a typical app does: remove() in ``finally``.

    With ``forget_on_error`` the app calls remove() on its success path only;
    the ``forget`` plan never calls it. The request runs in ``setup.scope(token)``
    (its own id by default).
    """
    rec = Record(rid=rid, plan=plan, rows=app.rows)
    t0 = time.perf_counter()
    remove = plan != P_FORGET and app.removes
    try:
        with app.setup.scope(token or rid):
            try:
                unit_of_work(app, rec)
                rec.outcome = OK
            except InjectedFailure:
                rec.outcome = FAILED
                if app.forget_on_error:
                    remove = False
            except Exception as exc:
                _error(rec, exc)
            except BaseException as exc:
                kind = app.hooks.interrupt_kind(exc)
                if kind is None:
                    raise
                planned = {P_TIMEOUT: TIMEOUT, P_KILL: KILLED}.get(plan)
                if kind == planned:
                    rec.outcome = kind
                else:
                    _error(rec, exc)
            finally:
                if remove:
                    rec.removed = True
                    try:
                        app.setup.remove()
                    except Exception as exc:
                        _error(rec, exc)
            if app.in_block is not None:
                app.in_block(rec)
    except Exception as exc:  # leaving the scope failed
        _error(rec, exc)
    rec.latency = time.perf_counter() - t0
    return rec
