"""Compare scoping.green's wait callback with psycogreen's (not run by the suite).

    SCOPING_TEST_PG_URL=postgresql://postgres@127.0.0.1/test \\
        .venv/bin/python tests/green_scripts/bench_callbacks.py

Prints, for each callback: microseconds per ``SELECT 1`` round trip (the
normal path, best of 7 interleaved rounds of 1000) and the milliseconds from a
``gevent.Timeout(0.05)`` firing to the caller getting it during
``pg_sleep(5)`` (median of 20), and whether the statement was left running.
"""

from gevent import monkey

monkey.patch_all()

# ruff: noqa: E402
import os
import statistics
import time
import typing as t

import gevent
import psycogreen.gevent
import psycopg2

from scoping.green import patch_psycopg2

DSN = os.environ.get("SCOPING_TEST_PG_URL", "postgresql://postgres@127.0.0.1/test").replace(
    "postgresql+psycopg2://", "postgresql://"
)


def round_trip(install: t.Callable[[], object], conn: t.Any) -> float:
    install()
    cur = conn.cursor()
    t0 = time.perf_counter()
    for _ in range(1000):
        cur.execute("SELECT 1")
        cur.fetchone()
    return (time.perf_counter() - t0) / 1000


def interrupted(label: str) -> tuple[float, int]:
    late = []
    for _ in range(20):
        conn = psycopg2.connect(DSN, application_name="bench-" + label)
        cur = conn.cursor()
        timer = gevent.Timeout(0.05)
        timer.start()
        t0 = time.perf_counter()
        try:
            cur.execute("SELECT pg_sleep(5)")
        except gevent.Timeout:
            late.append((time.perf_counter() - t0 - 0.05) * 1000)
        finally:
            timer.close()
        conn.close()
    mon = psycopg2.connect(DSN)
    mon.autocommit = True
    c = mon.cursor()
    c.execute(
        "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = %s AND state = 'active'",
        ("bench-" + label,),
    )
    row = c.fetchone()
    mon.close()
    return statistics.median(late), row[0] if row else -1


def main() -> None:
    installers = {"psycogreen": psycogreen.gevent.patch_psycopg, "scoping": patch_psycopg2}
    conn = psycopg2.connect(DSN)
    conn.autocommit = True
    best = dict.fromkeys(installers, float("inf"))
    for _ in range(7):  # interleaved rounds, best of each: the machine is shared
        for label, install in installers.items():
            best[label] = min(best[label], round_trip(install, conn))
    conn.close()
    for label, install in installers.items():
        install()
        late, left = interrupted(label)
        print(
            f"{label:10s} SELECT 1: {best[label] * 1e6:6.1f} us   Timeout -> caller: "
            f"{late:5.2f} ms (median of 20)   statements left running: {left}/20"
        )


if __name__ == "__main__":
    main()
