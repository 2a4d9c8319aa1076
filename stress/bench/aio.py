"""The asyncio sections of ``python -m stress.bench``.

``aproxy``  ns per call of ``Session.info``, ``Session.get_bind()`` and
            ``Session()`` from inside a running task, for
            :class:`scoping.asyncio.async_scoped_session` (``auto``,
            ``contextvar``, ``token`` inside ``scope()``, ``request`` inside an
            ASGI request scope, ``auto+guard``) against SQLAlchemy's
            ``async_scoped_session(scopefunc=asyncio.current_task)`` in the same
            run. Same method as ``proxy``: ``timeit`` loops inside the timer,
            variants interleaved, minimum over rounds minus an empty loop.
``acycle``  one request's Session handling, no I/O, in a fresh task per
            request: ``Session()``, an ``info`` write, ``await remove()``
            (``scope``: ``async with Session.scope()``; ``explicit``:
            ``async with factory() as s``, the no-registry floor; ``no-remove``:
            the task just ends and scoping's cleanup task closes the Session).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import timeit
import typing as t

Json = dict[str, t.Any]

APROXY_OPS = {"info": "S.info", "method": "S.get_bind()", "call": "S()"}
ASYNC_STRATEGIES = ("auto", "contextvar", "token", "request")


def _factory() -> t.Any:
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    # Never connects: nothing timed here does I/O (get_bind() only needs a bind).
    return async_sessionmaker(create_async_engine("postgresql+asyncpg://bench@127.0.0.1/bench"))


@contextlib.contextmanager
def _request_scope() -> t.Iterator[None]:
    """Be inside an ASGI request scope, as SessionMiddleware makes one."""
    from scoping import asgi

    token = asgi._request.set(asgi._Request(asgi._Phase("GET /bench")))
    try:
        yield
    finally:
        asgi._request.reset(token)


def _aproxy_variants() -> list[tuple[str, t.Any]]:
    from sqlalchemy.ext.asyncio import async_scoped_session as sa_async_scoped_session

    from scoping.asgi import RequestScope
    from scoping.asyncio import async_scoped_session

    factory = _factory()
    variants: list[tuple[str, t.Any]] = [
        ("direct", factory()),
        ("sqlalchemy", sa_async_scoped_session(factory, scopefunc=asyncio.current_task)),
    ]
    for name in ASYNC_STRATEGIES:
        scope: t.Any = RequestScope() if name == "request" else name
        variants.append((name, async_scoped_session(factory, scope=scope)))
    variants.append(("auto+guard", async_scoped_session(factory, guard=True)))
    return variants


async def _aproxy(number: int, rounds: int) -> Json:
    variants = _aproxy_variants()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_request_scope())
        blocks = []
        for name, obj in variants:
            if name == "token":
                block = obj.scope("t")
                await block.__aenter__()
                blocks.append(block)
            if name != "direct":
                obj()  # the Session exists: every timed call is a hit
        empty = timeit.Timer("pass")
        best_empty = float("inf")
        timers = [
            (name, op, timeit.Timer(stmt, globals={"S": obj}))
            for name, obj in variants
            for op, stmt in APROXY_OPS.items()
            if not (name == "direct" and op == "call")
        ]
        samples: dict[tuple[str, str], float] = {}
        for _ in range(rounds):
            best_empty = min(best_empty, empty.timeit(number))
            for name, op, timer in timers:
                took = timer.timeit(number)
                samples[(name, op)] = min(samples.get((name, op), float("inf")), took)
        for block in blocks:
            await block.__aexit__(None, None, None)
        for name, obj in variants:
            if name not in ("direct", "token"):
                await obj.remove()
    loop_ns = best_empty / number * 1e9
    results: dict[str, dict[str, Json]] = {}
    for (name, op), took in samples.items():
        results.setdefault(name, {})[op] = {"ns": round(took / number * 1e9 - loop_ns, 1)}
    for ops in results.values():
        for op, cell in ops.items():
            cell["ratio"] = round(cell["ns"] / results["sqlalchemy"][op]["ns"], 3)
    return {
        "ops": {op: stmt.replace("S", "Session", 1) for op, stmt in APROXY_OPS.items()},
        "stat": f"min over {rounds} interleaved rounds of {number} calls, minus an empty loop",
        "loop_ns": round(loop_ns, 1),
        "baseline": "sqlalchemy.ext.asyncio.async_scoped_session(scopefunc=asyncio.current_task)",
        "results": results,
    }


def bench_aproxy(number: int, rounds: int) -> Json:
    return asyncio.run(_aproxy(number, rounds))


async def _acycle(number: int, rounds: int) -> Json:
    from sqlalchemy.ext.asyncio import async_scoped_session as sa_async_scoped_session

    from scoping.asyncio import async_scoped_session

    factory = _factory()

    async def explicit() -> None:
        async with factory() as session:
            session.info["request"] = 1

    def proxied(S: t.Any) -> t.Callable[[], t.Coroutine[t.Any, t.Any, None]]:
        async def cycle() -> None:
            S()
            S.info["request"] = 1
            await S.remove()

        return cycle

    def scoped(S: t.Any) -> t.Callable[[], t.Coroutine[t.Any, t.Any, None]]:
        async def cycle() -> None:
            async with S.scope() as session:
                session.info["request"] = 1

        return cycle

    no_remove_S = async_scoped_session(factory)

    async def no_remove() -> None:
        no_remove_S().info["request"] = 1

    variants: list[tuple[str, t.Callable[[], t.Coroutine[t.Any, t.Any, None]]]] = [
        ("explicit", explicit),
        ("sqlalchemy", proxied(sa_async_scoped_session(factory, asyncio.current_task))),
        ("auto", proxied(async_scoped_session(factory))),
        ("auto scope()", scoped(async_scoped_session(factory))),
        ("contextvar", proxied(async_scoped_session(factory, scope="contextvar"))),
        ("auto no-remove", no_remove),
    ]

    async def timed(fn: t.Callable[[], t.Coroutine[t.Any, t.Any, None]]) -> float:
        started = time.perf_counter()
        for _ in range(number):
            await asyncio.create_task(fn())
        if fn is no_remove:
            await no_remove_S.registry.acollect()  # its closes are part of its cost
        return time.perf_counter() - started

    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in variants:
            took = await timed(fn)
            best[name] = min(best.get(name, float("inf")), took)
    floor = best["explicit"] / number * 1e6
    results = {
        name: {
            "us": round(took / number * 1e6, 2),
            "extra_us": round(took / number * 1e6 - floor, 2),
        }
        for name, took in best.items()
    }
    base = results["sqlalchemy"]["us"]
    for cell in results.values():
        cell["ratio"] = round(cell["us"] / base, 3)
    return {
        "stat": f"min over {rounds} interleaved rounds of {number} requests, each in a fresh task",
        "cycle": "create_task(request()); request: Session(); Session.info write; "
        "await Session.remove()",
        "results": results,
    }


def bench_acycle(number: int, rounds: int) -> Json:
    return asyncio.run(_acycle(number, rounds))
