"""How long after a scope ends is its forgotten Session closed, untouched?

For each kind of scope, a unit uses the registry's Session and ends without
``remove()``; then *nothing* touches the registry again (no new Session, no
``collect()``): the process only waits. The time from the unit's last
statement to ``Session.close()`` is recorded; ``repeat`` runs per kind.

Usage::

    python tests/scripts/cleanup_bounds.py [repeat] [--gevent]

Prints one JSON line: ``{kind: {"median_ms": .., "max_ms": .., "closed": n, "runs": n}}``.
``--gevent`` runs the gevent kinds (``patch_all()`` first, in this process).
A kind whose Sessions were not all closed within 5 s reports ``closed < runs``.
"""

from __future__ import annotations

import sys

GEVENT = "--gevent" in sys.argv
if GEVENT:
    from gevent import monkey

    monkey.patch_all()

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import typing as t  # noqa: E402

import greenlet  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

import scoping  # noqa: E402

WAIT = 5.0


class Timed(Session):
    closed_at: t.ClassVar[list[float]] = []

    def close(self) -> None:
        Timed.closed_at.append(time.monotonic())
        super().close()


def _wait_closed(before: int) -> float | None:
    deadline = time.monotonic() + WAIT
    while len(Timed.closed_at) == before and time.monotonic() < deadline:
        if GEVENT:
            import gevent

            gevent.sleep(0.001)
        else:
            time.sleep(0.001)
    return Timed.closed_at[before] if len(Timed.closed_at) > before else None


def _one(strategy: str, run: t.Callable[[scoping.scoped_session[Timed]], float]) -> float | None:
    S = scoping.scoped_session(
        sessionmaker(bind=create_engine("sqlite://"), class_=Timed), scope=strategy
    )
    before = len(Timed.closed_at)
    ended = run(S)
    closed = _wait_closed(before)
    return None if closed is None else (closed - ended) * 1000


def os_thread(S: scoping.scoped_session[Timed]) -> float:
    ended: list[float] = []

    def unit() -> None:
        S.info  # noqa: B018  (makes the Session)
        ended.append(time.monotonic())

    th = threading.Thread(target=unit)
    th.start()
    th.join()
    return ended[0]


def raw_greenlet(S: scoping.scoped_session[Timed]) -> float:
    ended: list[float] = []
    main = greenlet.getcurrent()

    def unit() -> None:
        S.info  # noqa: B018
        main.switch()  # lives on a little while the pollers look at it
        ended.append(time.monotonic())

    g = greenlet.greenlet(unit)
    g.switch()
    time.sleep(0.05)
    g.switch()
    return ended[0]


def asyncio_task(S: scoping.scoped_session[Timed]) -> float:
    ended: list[float] = []

    async def unit() -> None:
        S.info  # noqa: B018
        ended.append(time.monotonic())

    async def main() -> None:
        await asyncio.create_task(unit())

    asyncio.run(main())
    return ended[0]


def to_thread_call(S: scoping.scoped_session[Timed]) -> float:
    ended: list[float] = []

    def unit() -> None:
        S.info  # noqa: B018
        ended.append(time.monotonic())

    async def main() -> None:
        await asyncio.to_thread(unit)

    asyncio.run(main())
    return ended[0]


def gevent_greenlet(S: scoping.scoped_session[Timed]) -> float:
    import gevent

    ended: list[float] = []

    def unit() -> None:
        S.info  # noqa: B018
        ended.append(time.monotonic())

    gevent.spawn(unit).join()
    return ended[0]


def token_block(S: scoping.scoped_session[Timed]) -> float:
    with S.scope("request"):
        S.info  # noqa: B018
        ended = time.monotonic()
    return ended


if GEVENT:
    KINDS: dict[str, tuple[str, t.Callable[[t.Any], float]]] = {
        "gevent greenlet (greenlet)": ("greenlet", gevent_greenlet),
        "gevent greenlet (thread, patched)": ("thread", gevent_greenlet),
        "gevent greenlet (contextvar)": ("contextvar", gevent_greenlet),
        "gevent greenlet (auto)": ("auto", gevent_greenlet),
        "raw greenlet under gevent (greenlet)": ("greenlet", raw_greenlet),
    }
else:
    KINDS = {
        "OS thread (thread)": ("thread", os_thread),
        "OS thread (greenlet)": ("greenlet", os_thread),
        "OS thread (contextvar)": ("contextvar", os_thread),
        "OS thread (auto)": ("auto", os_thread),
        "asyncio task (auto)": ("auto", asyncio_task),
        "asyncio task (contextvar)": ("contextvar", asyncio_task),
        "to_thread call (auto)": ("auto", to_thread_call),
        "raw greenlet (greenlet)": ("greenlet", raw_greenlet),
        "raw greenlet (contextvar)": ("contextvar", raw_greenlet),
        "token block exit (token)": ("token", token_block),
    }


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    repeat = int(args[0]) if args else 10
    out: dict[str, dict[str, float | int]] = {}
    for kind, (strategy, run) in KINDS.items():
        times = [_one(strategy, run) for _ in range(repeat)]
        done = [x for x in times if x is not None]
        with contextlib.suppress(statistics.StatisticsError):
            out[kind] = {
                "median_ms": round(statistics.median(done), 2),
                "max_ms": round(max(done), 2),
            }
        out.setdefault(kind, {})
        out[kind].update(closed=len(done), runs=repeat)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
