"""Subprocess side of ``python -m stress.bench``: one measurement per process.

Usage: ``python -m stress.bench.worker KIND``, with the JSON arguments as the
first line of stdin (they may hold a DSN, which never goes in argv); prints
one JSON object on stdout. ``KIND`` is ``scale`` (raw greenlets, no gevent),
``proxy`` (for ``--against``: run from another tree's ``scoping``), ``memory``
or ``e2e`` (both under ``gevent.monkey.patch_all()``, done here, first thing,
before SQLAlchemy or scoping is imported). Each run lives in its own process
so that a measurement never inherits another one's heap, patched modules or
pool.
"""

from __future__ import annotations

import statistics
import sys

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] in ("memory", "e2e"):
    from gevent import monkey

    monkey.patch_all()

import gc
import json
import os
import time
import timeit
import typing as t

STRATEGIES = ("thread", "greenlet", "contextvar", "token", "auto")


def _rss() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


# --- scale: lookup cost with N live scopes ----------------------------------


def scale(args: dict[str, t.Any]) -> dict[str, t.Any]:
    """``Session.info`` from the main greenlet while N raw greenlets hold a Session each.

    The greenlets are parked mid-function (inside ``Session.scope(token)`` for the
    token strategy), so every scope is alive while the lookups are timed.
    """
    import greenlet
    from sqlalchemy import create_engine
    from sqlalchemy.orm import scoped_session as sa_scoped_session
    from sqlalchemy.orm import sessionmaker

    import scoping

    variant: str = args["variant"]
    sizes: list[int] = args["sizes"]
    number: int = args["number"]
    rounds: int = args["rounds"]
    factory = sessionmaker(bind=create_engine("sqlite://"))
    session: t.Any
    if variant == "sqlalchemy":
        session = sa_scoped_session(factory, scopefunc=greenlet.getcurrent)
    else:
        session = scoping.scoped_session(factory, scope=variant)
    main_scope = None
    if variant == "token":
        main_scope = session.scope("main")
        main_scope.__enter__()
    session()  # the timed scope holds a Session too

    def park(i: int) -> None:
        main = greenlet.getcurrent().parent
        if variant == "token":
            with session.scope(i):
                session()
                main.switch()
        else:
            session()
            main.switch()

    parked: list[greenlet.greenlet] = []
    timer = timeit.Timer("S.info", globals={"S": session})
    empty = timeit.Timer("pass")
    # SQLAlchemy's thread-local proxy, timed in the same rounds: its cost does
    # not depend on the number of scopes, so ns / reference cancels the
    # machine's slow phases (which last longer than one size's rounds).
    reference = sa_scoped_session(factory)
    reference()
    reference_timer = timeit.Timer("R.info", globals={"R": reference})
    out: list[dict[str, t.Any]] = []
    for size in sizes:
        while len(parked) < size - 1:  # the main greenlet is one of the live scopes
            g = greenlet.greenlet(park)
            g.switch(len(parked))
            parked.append(g)
        live = len(session.registry.registry)
        ns, ratio = _time_against(timer, reference_timer, empty, number, rounds)
        out.append({"scopes": size, "live": live, "ns": ns, "ratio": ratio})
    for g in parked:  # finish each greenlet: scope() exits and removes its Session
        g.switch()
    if main_scope is not None:
        main_scope.__exit__(None, None, None)
    return {"variant": variant, "points": out}


def _time_against(
    timer: timeit.Timer, reference: timeit.Timer, empty: timeit.Timer, number: int, rounds: int
) -> tuple[float, float]:
    """(ns per call: min over rounds, ratio: median of the same round's ratio to ``reference``).

    Only a slow phase shorter than one round (two timings) can move the ratio.
    """
    took, references, empties = [], [], []
    for _ in range(rounds):
        took.append(timer.timeit(number))
        references.append(reference.timeit(number))
        empties.append(empty.timeit(number))
    floor = min(empties)
    ratio = statistics.median(
        (ours - floor) / (ref - floor) for ours, ref in zip(took, references, strict=True)
    )
    return round((min(took) - floor) / number * 1e9, 1), round(ratio, 3)


# --- memory without remove() ------------------------------------------------


def memory(args: dict[str, t.Any]) -> dict[str, t.Any]:  # noqa: C901, PLR0915 - one measurement
    """N short-lived gevent greenlets call ``Session()`` (and execute) and never remove()."""
    import gevent
    import gevent.pool
    import greenlet
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import sessionmaker
    from sqlalchemy.util import ScopedRegistry

    import scoping

    variant: str = args["variant"]
    count: int = args["greenlets"]
    wave: int = args["wave"]
    path: str = args["sqlite"]
    execute = variant != "sqlalchemy"
    engine = create_engine(
        f"sqlite:///{path}", pool_size=5, max_overflow=0, pool_timeout=args["pool_timeout"]
    )
    factory = sessionmaker(bind=engine)
    registry: t.Any
    if variant == "sqlalchemy":
        registry = ScopedRegistry(factory, scopefunc=greenlet.getcurrent)

        def size() -> int:
            return len(registry.registry)

        get = registry
    else:
        # "token" here is the drop-in migration: scopefunc=greenlet.getcurrent.
        if variant == "token":
            session = scoping.scoped_session(factory, scopefunc=greenlet.getcurrent)
        else:
            session = scoping.scoped_session(factory, scope=variant)

        def size() -> int:
            return len(session.registry)

        get = session

    def work() -> None:
        s = get()
        if execute:
            s.execute(text("select 1"))

    def run(n: int) -> None:
        done = 0
        while done < n:
            batch = min(wave, n - done)
            gevent.joinall([gevent.spawn(work) for _ in range(batch)], raise_error=True)
            done += batch

    def settle() -> None:
        # Let the hub run rawlink callbacks and the cleanup greenlets they spawn.
        for _ in range(5):
            gevent.sleep(0)
        gc.collect()
        for _ in range(5):
            gevent.sleep(0)

    run(min(2000, count))  # warm-up: imports, pool connections, allocator arenas
    settle()
    gc.collect()
    rss_before = _rss()
    started = time.perf_counter()
    run(count)
    elapsed = time.perf_counter() - started
    live_at_end = size()
    settle()
    rss_after = _rss()
    result: dict[str, t.Any] = {
        "variant": variant,
        "greenlets": count,
        "executes": execute,
        "seconds": round(elapsed, 2),
        "sessions_before_settle": live_at_end,
        "sessions": size(),
        "checked_out": engine.pool.checkedout(),  # type: ignore[attr-defined]
        "rss_growth_mb": round((rss_after - rss_before) / 2**20, 2),
    }
    if variant == "sqlalchemy":
        # The same registry with an execute per greenlet: count how many greenlets get
        # a connection before the pool (size 5, no overflow) is exhausted for good.
        from sqlalchemy.exc import TimeoutError as PoolTimeout

        probe = create_engine(f"sqlite:///{path}", pool_size=5, max_overflow=0, pool_timeout=0.05)
        probe_registry = ScopedRegistry(sessionmaker(bind=probe), scopefunc=greenlet.getcurrent)

        def probe_one() -> bool:
            try:
                probe_registry().execute(text("select 1"))
            except PoolTimeout:
                return False
            return True

        served = 0
        while served < 20 and gevent.spawn(probe_one).get():
            served += 1
        result["probe_executes_before_pool_timeout"] = served
        result["probe_checked_out"] = probe.pool.checkedout()  # type: ignore[attr-defined]
    return result


# --- end to end under gevent against PostgreSQL ------------------------------


def e2e(args: dict[str, t.Any]) -> dict[str, t.Any]:  # noqa: PLR0915 - one measurement
    """Serve timed runs for one variant: 200 greenlets, two SELECTs and a commit per request.

    The process stays up and reads one JSON command per line on stdin (``{}`` =
    one run of ``requests`` requests), so the parent can interleave the
    variants run by run without paying interpreter start-up each time. It
    prints ``{"ready": true}`` first, then one result per command. Each run
    warms the pool up (untimed) and disposes of it at the end, so only one
    variant holds PostgreSQL connections at a time.
    """
    import gevent
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import sessionmaker

    import scoping
    from scoping.green import patch_psycopg2

    patch_psycopg2()
    variant: str = args["variant"]
    concurrency: int = args["concurrency"]
    total: int = args["requests"]
    engine = create_engine(
        args["url"], pool_size=args["pool_size"], max_overflow=0, pool_timeout=60
    )
    factory = sessionmaker(bind=engine)
    q1 = text("SELECT 1")
    q2 = text("SELECT count(*) FROM pg_class WHERE relkind = 'r' AND relname = :n")

    if variant == "baseline":

        def request(i: int) -> None:
            with factory() as s:  # one explicit Session per request, no registry
                s.execute(q1)
                s.execute(q2, {"n": "pg_class"})
                s.info["i"] = i
                s.commit()

    elif variant == "token":
        session = scoping.scoped_session(factory, scope="token")

        def request(i: int) -> None:
            with session.scope(i):
                session.execute(q1)
                session.execute(q2, {"n": "pg_class"})
                session.info["i"] = i
                session.commit()

    else:
        session = scoping.scoped_session(factory, scope=variant)

        def request(i: int) -> None:
            try:
                session.execute(q1)
                session.execute(q2, {"n": "pg_class"})
                session.info["i"] = i
                session.commit()
            finally:
                session.remove()

    latencies: list[float] = []
    counter = iter(range(10**9))
    sleep = gevent.sleep
    clock = time.perf_counter
    cpu = time.process_time

    def client(limit: int) -> None:
        for i in counter:
            if i >= limit:
                return
            t0 = clock()
            request(i)
            latencies.append(clock() - t0)
            # A client's own I/O between requests: lets greenlets waiting for a
            # pooled connection take it, instead of this one barging back in.
            sleep(0)

    def drive(limit: int) -> float:
        nonlocal counter
        counter = iter(range(limit))
        started = clock()
        gevent.joinall([gevent.spawn(client, limit) for _ in range(concurrency)], raise_error=True)
        return clock() - started

    def one_run() -> dict[str, t.Any]:
        drive(concurrency * 2)  # warm-up: fill the pool, compile statements
        latencies.clear()
        gc.collect()
        cpu_started = cpu()
        elapsed = drive(total)
        cpu_used = cpu() - cpu_started
        latencies.sort()
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        engine.dispose()
        return {
            "variant": variant,
            "requests": len(latencies),
            "seconds": round(elapsed, 3),
            "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
            "p99_ms": round(p99 * 1000, 2),
            "cpu_us_per_request": round(cpu_used / len(latencies) * 1e6, 1),
        }

    _reply({"ready": True})
    for line in sys.stdin:
        if line.strip():
            _reply(one_run())
    return {"done": True}


# --- proxy: the proxy section, for --against (run from another tree's scoping) ---


def proxy(args: dict[str, t.Any]) -> dict[str, t.Any]:
    """The proxy section without guard variants, plus which ``scoping`` ran it."""
    import scoping

    from . import bench_proxy

    result = bench_proxy(args["number"], args["rounds"], guards=False)
    result["scoping_file"] = scoping.__file__
    return result


def _reply(obj: dict[str, t.Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


KINDS: dict[str, t.Callable[[dict[str, t.Any]], dict[str, t.Any]]] = {
    "scale": scale,
    "memory": memory,
    "e2e": e2e,
    "proxy": proxy,
}


def main(argv: list[str]) -> int:
    (kind,) = argv
    result = KINDS[kind](json.loads(sys.stdin.readline()))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
