"""What asyncpg and psycopg 3 async do when a task is cancelled mid-query or mid-remove().

Measured against the real PostgreSQL, through scoping.asyncio.async_scoped_session.
``python -m pytest tests/test_asyncio_cancel.py -v -s`` prints the figures that
docs/asyncio.md quotes: how long the cancel took, how long the statement stayed
in ``pg_stat_activity`` afterwards, and what the pool holds.
"""

from __future__ import annotations

import asyncio
import time
import typing as t

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from scoping.asyncio import async_scoped_session

DRIVERS = ["asyncpg", "psycopg"]
MARK = "h6-cancel-probe"


async def running(engine: AsyncEngine, tag: str) -> int:
    """Statements tagged ``tag`` still active on the server (seen from another connection)."""
    async with engine.connect() as conn:
        count = await conn.scalar(
            text(
                "select count(*) from pg_stat_activity where state = 'active' "
                "and query like :q and pid <> pg_backend_pid()"
            ),
            {"q": f"%{tag}%"},
        )
    return int(count or 0)


async def until_gone(engine: AsyncEngine, tag: str, limit: float = 5.0) -> float:
    started = time.monotonic()
    while await running(engine, tag):
        assert time.monotonic() - started < limit, f"{tag} still running after {limit} s"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def make(pg_url: str, driver: str) -> AsyncEngine:
    url = make_url(pg_url).set(drivername=f"postgresql+{driver}")
    return create_async_engine(url, pool_size=3, max_overflow=0)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_cancel_mid_query_stops_the_statement_and_frees_the_connection(
    pg_url: str, driver: str, how: str
) -> None:
    figures: dict[str, t.Any] = {}

    async def main() -> None:
        engine = make(pg_url, driver)
        S = async_scoped_session(async_sessionmaker(engine))
        tag = f"{MARK}-{driver}-{how}"

        async def query() -> None:
            await S.execute(text(f"select pg_sleep(30) /* {tag} */"))

        if how == "cancel":
            task = asyncio.create_task(query())
            while not await running(engine, tag):
                await asyncio.sleep(0.01)
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:

            async def bounded() -> None:
                async with asyncio.timeout(0.3):
                    await query()

            task = asyncio.create_task(bounded())
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await task
            started += 0.3
        figures["cancel_s"] = time.monotonic() - started
        figures["gone_after_s"] = await until_gone(engine, tag)
        # The task ended without remove(): its Session is closed on the loop.
        await S.registry.acollect()
        for _ in range(200):
            if not S.registry.pending() and engine.sync_engine.pool.checkedout() == 0:
                break
            await asyncio.sleep(0.005)
        figures["checkedout"] = engine.sync_engine.pool.checkedout()
        figures["registry"] = len(S.registry)
        # The connection that was interrupted still works (or was replaced).
        async with S.scope() as session:
            assert await session.scalar(text("select 1")) == 1
        figures["pool"] = engine.sync_engine.pool.status()
        await engine.dispose()

    asyncio.run(main())
    print(f"\n{driver} {how}: {figures}")
    assert figures["checkedout"] == 0
    assert figures["registry"] == 0
    assert figures["gone_after_s"] < 1.0


@pytest.mark.parametrize("driver", DRIVERS)
def test_cancel_mid_remove_never_leaks(pg_url: str, driver: str) -> None:
    """A cancel that lands inside remove()'s close: the cleanup task finishes it."""
    results: list[int] = []

    async def main() -> None:
        engine = make(pg_url, driver)
        S = async_scoped_session(async_sessionmaker(engine))

        async def work(delay: float) -> None:
            await S.execute(text("select 1"))  # a transaction is open: close() rolls back
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().call_later(delay, task.cancel)
            await S.remove()
            await asyncio.sleep(1)  # remove() finished first: cancelled here instead

        for delay in (0, 0.0002, 0.0005, 0.001, 0.002, 0.005):
            task = asyncio.create_task(work(delay))
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):
                if not S.registry.pending() and engine.sync_engine.pool.checkedout() == 0:
                    break
                await asyncio.sleep(0.005)
            results.append(engine.sync_engine.pool.checkedout() + len(S.registry))
        await engine.dispose()

    asyncio.run(main())
    assert results == [0] * 6
