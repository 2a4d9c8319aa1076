"""The application under test on asyncio: the same request as :mod:`stress.app`,
with an ``AsyncSession`` (asyncpg) and ``await``.

A request takes its scope's AsyncSession, adds rows tagged with its request id,
yields on database I/O (``pg_sleep(0.001)``, which autoflushes), flushes, reads
its rows back, commits, then refreshes a committed object (as rendering a
response does: a new transaction that holds a connection until ``remove()``).
Planned requests raise after their flush, never call ``remove()``, or are
cancelled in the middle of a ``pg_sleep(1)``. The same :class:`Record` and
detectors as the sync app apply (they look at ``AsyncSession.sync_session``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import typing as t

from sqlalchemy import select, text

from .app import P_FAIL, P_FORGET, P_KILL, InjectedFailure, _error
from .detectors import FAILED, KILLED, OK, OWNER, Record, foreign_objects, stale_state

if t.TYPE_CHECKING:
    import contextvars

    from sqlalchemy.ext.asyncio import AsyncSession


class AsyncSetup(t.Protocol):
    """How the app gets and drops its AsyncSession."""

    name: str

    def session(self) -> AsyncSession: ...

    async def remove(self) -> None: ...

    def scope(self, rid: str) -> t.AsyncContextManager[t.Any]: ...

    def registry_size(self) -> int | None: ...


@dataclasses.dataclass
class AsyncSAScoped:
    """SQLAlchemy's own ``async_scoped_session`` (the naive baselines)."""

    name: str
    proxy: t.Any  # sqlalchemy.ext.asyncio.async_scoped_session
    token_var: contextvars.ContextVar[str] | None = None

    def session(self) -> AsyncSession:
        return t.cast("AsyncSession", self.proxy())

    async def remove(self) -> None:
        await self.proxy.remove()

    def scope(self, rid: str) -> t.AsyncContextManager[t.Any]:
        return contextlib.nullcontext()

    def registry_size(self) -> int | None:
        reg = getattr(self.proxy.registry, "registry", None)
        return len(reg) if isinstance(reg, dict) else None


@dataclasses.dataclass
class AsyncScoped:
    """A ``scoping.asyncio.async_scoped_session`` with one strategy."""

    name: str
    proxy: t.Any  # scoping.asyncio.async_scoped_session

    def session(self) -> AsyncSession:
        return t.cast("AsyncSession", self.proxy())

    async def remove(self) -> None:
        await self.proxy.remove()

    def scope(self, rid: str) -> t.AsyncContextManager[t.Any]:
        if self.name == "token":
            return t.cast("t.AsyncContextManager[t.Any]", self.proxy.scope(rid))
        return contextlib.nullcontext()

    def registry_size(self) -> int | None:
        return len(self.proxy.registry)


@dataclasses.dataclass
class AsyncApp:
    setup: AsyncSetup
    model: type[t.Any]
    tag: str
    rows: int = 3
    long_seconds: float = 1.0
    forget_on_error: bool = False  # the error path (an exception, a cancel) skips remove()
    on_long_statement: t.Callable[[str], None] = lambda rid: None


async def _io(s: AsyncSession) -> None:
    await s.execute(text("SELECT pg_sleep(0.001)"))


def _check(s: AsyncSession, rec: Record) -> None:
    rec.leaked = max(rec.leaked, foreign_objects(s.sync_session, rec.rid))


async def unit_of_work(app: AsyncApp, rec: Record) -> None:
    s = app.setup.session()
    rec.stale = stale_state(s.sync_session)
    objs = [app.model(request_id=rec.rid, payload=f"{rec.rid}/{i}") for i in range(app.rows)]
    for obj in objs:
        setattr(obj, OWNER, rec.rid)
    s.add_all(objs)
    _check(s, rec)
    await _io(s)
    _check(s, rec)
    await s.flush()
    await _io(s)
    _check(s, rec)
    found = await s.scalars(select(app.model.id).where(app.model.request_id == rec.rid))
    rec.readback = len(found.all())
    _check(s, rec)
    if rec.plan == P_FAIL:
        raise InjectedFailure(f"request {rec.rid} failed after its flush")
    if rec.plan == P_KILL:
        app.on_long_statement(rec.rid)
        await s.execute(
            text(f"SELECT pg_sleep({app.long_seconds:.3f}) /* stress-req {app.tag} {rec.rid} */")
        )
    rec.xact = int((await s.execute(text("SELECT txid_current()"))).scalar_one())
    await s.commit()
    rec.committed = True
    await s.refresh(objs[0])  # like rendering a response: a new transaction


async def handle(app: AsyncApp, rid: str, plan: str, out: dict[str, Record]) -> Record:
    """Run one request; ``remove()`` in ``finally`` unless the plan or error path skips it.

    The record goes into ``out`` first, so a request cancelled from outside still
    leaves it behind (the cancellation propagates, as it must).
    """
    rec = out[rid] = Record(rid=rid, plan=plan, rows=app.rows)
    t0 = time.perf_counter()
    remove = plan != P_FORGET
    try:
        async with app.setup.scope(rid):
            try:
                await unit_of_work(app, rec)
                rec.outcome = OK
            except InjectedFailure:
                rec.outcome = FAILED
                remove = remove and not app.forget_on_error
            except asyncio.CancelledError:
                if plan == P_KILL:
                    rec.outcome = KILLED
                else:
                    _error(rec, asyncio.CancelledError("cancelled without a plan"))
                remove = remove and not app.forget_on_error
                raise
            except Exception as exc:
                _error(rec, exc)
            finally:
                if remove:
                    rec.removed = True
                    try:
                        await app.setup.remove()
                    except Exception as exc:
                        _error(rec, exc)
    except Exception as exc:  # leaving the scope failed
        _error(rec, exc)
    finally:
        rec.latency = time.perf_counter() - t0
    return rec
