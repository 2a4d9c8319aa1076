"""Interrupt a ``pg_sleep`` under gevent and report, as JSON, what is left behind.

Run by tests/test_green.py in a fresh interpreter (gevent is never patched in
the pytest process)::

    python pg_interrupt.py CALLBACK INTERRUPTION TAG

CALLBACK is ``scoping`` (scoping.green.patch_psycopg2), ``psycogreen``,
``none`` (no wait callback), ``psycopg3`` (the psycopg 3 driver, no
callback) or ``psycopg3-cancel`` (psycopg 3 plus the ``handle_error``
recipe in the README, "psycopg 3"). INTERRUPTION is ``timeout``
(``gevent.Timeout(0.3)``) or ``kill``
(``Greenlet.kill()`` once the statement is seen active). TAG is the
``application_name`` of every connection of the run, so parallel runs do not
see each other in ``pg_stat_activity``. The database URL comes from the
``SCOPING_TEST_PG_URL`` environment variable.
"""

from gevent import monkey

monkey.patch_all()

# ruff: noqa: E402  (everything below must come after patch_all)
import json
import os
import sys
import time
import typing as t

import gevent
from sqlalchemy import create_engine, event, text
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool, QueuePool

import scoping

TIMEOUT = 0.3
#: How long after the interruption the statement may still be active.
GONE_WITHIN = 1.0


# One scripted scenario, read top to bottom: splitting it would scatter the
# measurement steps the test asserts on.
def main() -> None:  # noqa: C901, PLR0915
    callback, interruption, tag = sys.argv[1:4]
    url = os.environ["SCOPING_TEST_PG_URL"]
    if callback == "scoping":
        from scoping.green import patch_psycopg2

        patch_psycopg2()
    elif callback == "psycogreen":
        import psycogreen.gevent

        psycogreen.gevent.patch_psycopg()
    elif callback in ("psycopg3", "psycopg3-cancel"):
        url = url.replace("postgresql+psycopg2://", "postgresql+psycopg://", 1)
    else:
        assert callback == "none", callback
    sleep_for = 1 if callback == "none" else 20

    engine = create_engine(url, connect_args={"application_name": tag}, pool_size=2, max_overflow=0)
    monitor = create_engine(
        url, connect_args={"application_name": tag + "-monitor"}, poolclass=NullPool
    )
    Session = scoping.scoped_session(sessionmaker(engine), scope="greenlet")
    out: dict[str, object] = {"callback": callback, "interruption": interruption}

    @event.listens_for(engine, "handle_error")
    def seen_by_sqlalchemy(ctx: t.Any) -> None:
        # What the driver left before SQLAlchemy invalidates (and closes) it.
        dbapi = ctx.connection.connection.dbapi_connection
        out["driver_closed_before_sqlalchemy"] = int(dbapi.closed)
        out["sqlalchemy_is_disconnect"] = ctx.is_disconnect
        out["sqlalchemy_invalidate_pool"] = ctx.invalidate_pool_on_disconnect

    if callback == "psycopg3-cancel":
        # The README recipe ("psycopg 3"), verbatim.
        @event.listens_for(engine, "handle_error")
        def cancel_interrupted_statement(ctx: t.Any) -> None:
            # gevent.Timeout and GreenletExit are BaseExceptions: psycopg 3
            # does not cancel the statement for them, so do it here.
            if isinstance(ctx.original_exception, Exception) or ctx.connection is None:
                return
            dbapi = ctx.connection.connection.dbapi_connection
            if dbapi is not None and not dbapi.closed:
                try:
                    dbapi.cancel_safe(timeout=5)
                except Exception:
                    pass  # never replace the interruption with a cancel error

    def active() -> int:
        with monitor.connect() as c:
            n: int = c.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :tag"
                    " AND state = 'active' AND query LIKE '%pg_sleep%'"
                ),
                {"tag": tag},
            ).scalar_one()
            return n

    ticks: list[float] = []

    def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.02)

    def request() -> None:
        conn = Session.connection()  # check out before the clock starts
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        out["backend_pid"] = dbapi.info.backend_pid
        sql = text(f"SELECT pg_sleep({sleep_for}) /* {tag} */")
        t0 = time.monotonic()
        out["started"] = t0
        timer = gevent.Timeout(TIMEOUT) if interruption == "timeout" else None
        try:
            if timer is not None:
                timer.start()
            Session.execute(sql)
            out["raised"] = None
        except BaseException as exc:
            out["raised"] = type(exc).__name__
            out["raised_is_our_timeout"] = exc is timer
            out["raised_is_greenlet_exit"] = isinstance(exc, gevent.GreenletExit)
            out["dbapi_closed"] = int(dbapi.closed)
            out["sa_invalidated"] = conn.invalidated
            raise
        finally:
            t1 = time.monotonic()
            out["interrupted_at"] = t1
            out["elapsed"] = t1 - t0
            out["ticks_during"] = sum(1 for x in ticks if t0 < x < t1)
            if timer is not None:
                timer.close()
            Session.remove()
            out["registry_len_after_remove"] = len(Session.registry)
            out["checkedout_after_remove"] = t.cast(QueuePool, engine.pool).checkedout()

    tick = gevent.spawn(ticker)
    g = gevent.spawn(request)
    if interruption == "kill":
        deadline = time.monotonic() + 10
        while not active():
            assert time.monotonic() < deadline, "statement never became active"
            gevent.sleep(0.01)
        g.kill(block=True, timeout=10)
        out["greenlet_value"] = type(g.value).__name__
    else:
        g.join(timeout=30)
        out["greenlet_exception"] = type(g.exception).__name__ if g.exception else None
    out["greenlet_dead"] = g.dead

    # Poll the server until the statement is gone, for at most GONE_WITHIN seconds.
    assert "interrupted_at" in out, out
    start: float = out["interrupted_at"]  # type: ignore[assignment]
    gone_after = None
    while True:
        n = active()
        now = time.monotonic()
        if n == 0:
            gone_after = now - start
            break
        if now - start >= GONE_WITHIN:
            break
        gevent.sleep(0.02)
    out["active_gone_after"] = gone_after
    out["active_after_poll"] = n

    # The next request on the same engine and registry.
    def next_request() -> int:
        try:
            value: int = Session.execute(text("SELECT 1")).scalar_one()
            return value
        finally:
            Session.remove()

    g2 = gevent.spawn(next_request)
    g2.join(timeout=10)
    out["next_request"] = g2.value
    out["checkedout_final"] = t.cast(QueuePool, engine.pool).checkedout()
    out["registry_len_final"] = len(Session.registry)
    tick.kill()
    for key in ("started", "interrupted_at"):
        out.pop(key)
    engine.dispose()
    monitor.dispose()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
