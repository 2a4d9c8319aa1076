"""One cell, run inside its own subprocess: ``python -m stress.worker CONFIG_JSON``.

It builds the cell's runtime (gevent patched fully, ``patch_all(thread=False)``,
or raw greenlets), its registry (a naive baseline or a scoping strategy), runs
the requests and writes one JSON object per line on stdout: ``ready``, one
``req`` per finished request (so a hang still leaves every finished record
behind) and ``done`` with the end-of-cell probe. It never decides whether
anything is a hang: the runner watches it from outside.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
import typing as t

_out = sys.stdout


def emit(event: str, **data: t.Any) -> None:
    _out.write(json.dumps({"ev": event, **data}) + "\n")
    _out.flush()


def _patch(runtime: str) -> None:
    if runtime == "gevent":
        from gevent import monkey

        monkey.patch_all()
    elif runtime == "gevent-nothread":
        from gevent import monkey

        monkey.patch_all(thread=False)


def _cooperative_psycopg2(runtime: str, setup: str, loop: t.Any) -> str:
    """Install a psycopg2 wait callback; return which one."""
    if runtime == "raw-greenlet":
        import psycopg2.extensions

        from .greenloop import wait_callback

        psycopg2.extensions.set_wait_callback(wait_callback(loop))
        return "stress.greenloop"
    if setup != "baseline":
        try:
            from scoping import green
        except ImportError:
            pass
        else:
            green.patch_psycopg2()
            return "scoping.green"
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()
    return "psycogreen"


def _engine(cfg: dict[str, t.Any]) -> t.Any:
    from sqlalchemy import create_engine

    kw: dict[str, t.Any] = {
        "pool_size": cfg["pool_size"],
        "max_overflow": 0,
        "pool_timeout": cfg["pool_timeout"],
    }
    if cfg["dialect"] == "postgresql":
        kw["connect_args"] = {"application_name": cfg["tag"]}
    else:
        kw["connect_args"] = {"timeout": 0.5}
    return create_engine(cfg["url"], **kw)


def _build_setup(cfg: dict[str, t.Any], engine: t.Any, token_var: t.Any) -> t.Any:
    from sqlalchemy.orm import sessionmaker

    from .app import SAScoped, Scoped

    factory = sessionmaker(bind=engine)
    name = cfg["setup"]
    scenario = cfg["scenario"]
    if name != "baseline":
        import scoping

        return Scoped(name, scoping.scoped_session(factory, scope=name))
    from sqlalchemy.orm import scoped_session

    if scenario == "ident-reuse":
        import threading

        # Looked up after patch_all(): gevent's get_ident, id(getcurrent()).
        return SAScoped(name, scoped_session(factory, scopefunc=threading.get_ident))
    if scenario == "no-remove":
        import greenlet

        return SAScoped(name, scoped_session(factory, scopefunc=greenlet.getcurrent))
    if scenario == "copied-context":
        return SAScoped(name, scoped_session(factory, scopefunc=token_var.get))
    return SAScoped(name, scoped_session(factory))


class Monitor:
    """Asks the server whether a request's statement is still running."""

    def __init__(self, url: str, tag: str, lock: t.Any) -> None:
        import psycopg2

        dsn = "postgresql://" + url.split("://", 1)[1]
        self.conn = psycopg2.connect(dsn, application_name=f"{tag}-monitor"[:63])
        self.conn.autocommit = True
        self.tag = tag
        self.lock = lock

    def running(self, rid: str) -> int:
        with self.lock, self.conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                "AND pid <> pg_backend_pid() AND query LIKE %s",
                (f"%stress-req {self.tag} {rid} %",),
            )
            row = cur.fetchone()
            return int(row[0]) if row else 0


def main(argv: list[str]) -> int:
    cfg: dict[str, t.Any] = json.loads(argv[0])
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    runtime = cfg["runtime"]
    late = cfg["late_build"]
    sqlite = cfg["dialect"] == "sqlite"

    import contextvars

    token_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_token")
    engine = setup = None

    def build() -> None:
        nonlocal engine, setup
        engine = _engine(cfg)
        setup = _build_setup(cfg, engine, token_var)
        # Apps connect once at start-up. It matters: SQLAlchemy runs the
        # dialect's first-connect step under a lock made by threading, and when
        # threading is not patched (raw greenlets, patch_all(thread=False)) two
        # greenlets connecting for the first time at once deadlock the thread.
        engine.connect().close()

    if late:
        build()  # the app is imported (engine and registry built) before patching
    _patch(runtime)
    loop = None
    if runtime == "raw-greenlet":
        from .greenloop import Loop

        loop = Loop()
        if engine is None:
            build()  # before the wait callback: the loop is not running yet
    driver = "sqlite3" if sqlite else _cooperative_psycopg2(runtime, cfg["setup"], loop)
    if engine is None:
        build()
    assert engine is not None and setup is not None

    import gc

    import psutil  # type: ignore[import-untyped]

    from . import app as appmod
    from .detectors import Probe

    proc = psutil.Process()
    model = appmod.make_model(cfg["table"])
    if runtime == "raw-greenlet":
        assert loop is not None
        lp = loop
        sleep0: t.Callable[[], None] = lambda: lp.sleep(0)  # noqa: E731
    else:
        import gevent

        sleep0 = lambda: gevent.sleep(0)  # noqa: E731
    if sqlite:
        hooks = appmod.sqlite_hooks(sleep0)
    else:
        hooks = appmod.postgres_hooks(cfg["tag"], cfg["long_seconds"])
    monitor = None
    if runtime != "raw-greenlet":
        import gevent
        import gevent.lock

        timeout_after = cfg["timeout_after"]
        hooks.timeout = lambda: gevent.Timeout(timeout_after)

        def interrupt_kind(exc: BaseException) -> str | None:
            if isinstance(exc, gevent.Timeout):
                return "timeout"
            if isinstance(exc, gevent.GreenletExit):
                return "killed"
            return None

        hooks.interrupt_kind = interrupt_kind
        if not sqlite and (cfg["mix"].get("timeout") or cfg["mix"].get("kill")):
            monitor = Monitor(cfg["url"], cfg["tag"], gevent.lock.Semaphore())

    the_app = appmod.App(
        setup=setup,
        model=model,
        hooks=hooks,
        rows=cfg["rows"],
        forget_on_error=cfg["forget_on_error"],
    )
    n = cfg["requests"]
    duration = cfg.get("duration")
    plans = appmod.iter_plans(cfg["seed"], cfg["scenario"], cfg["mix"])
    emit("ready", driver=driver, pid=os.getpid())
    rss_start = proc.memory_info().rss
    t0 = time.perf_counter()
    stop_at = time.monotonic() + duration if duration else None
    dispatched = 0

    def report(rec: t.Any) -> None:
        emit("req", **rec.to_json())

    def next_request() -> tuple[str, str] | None:
        nonlocal dispatched
        if stop_at is not None:
            if time.monotonic() >= stop_at:
                return None
        elif dispatched >= n:
            return None
        i = dispatched
        dispatched += 1
        return f"r{i}", next(plans)

    if runtime == "raw-greenlet":
        assert loop is not None

        def raw_worker() -> None:
            while True:
                item = next_request()
                if item is None:
                    return
                report(appmod.handle(the_app, *item))

        for _ in range(cfg["concurrency"]):
            loop.spawn(raw_worker)
        loop.run()
    else:
        import gevent
        import gevent.event
        import gevent.pool

        kill_after = cfg["kill_after"]

        def dispatch(rid: str, plan: str) -> None:
            if plan != appmod.P_KILL:
                rec = appmod.handle(the_app, rid, plan)
            else:
                # handle() calls on_long_statement(rid) right before the statement
                started = waiting[rid] = gevent.event.Event()
                g = gevent.spawn(appmod.handle, the_app, rid, plan)
                gevent.wait([started, g], count=1)
                if not g.dead:
                    gevent.sleep(kill_after)
                    g.kill(block=True)
                waiting.pop(rid, None)
                rec = g.value
            interrupted = plan in (appmod.P_TIMEOUT, appmod.P_KILL)
            if rec is not None and monitor is not None and interrupted:
                rec.lingering = monitor.running(rid)
            if rec is not None:
                report(rec)

        waiting: dict[str, t.Any] = {}

        def on_long(rid: str) -> None:
            ev = waiting.get(rid)
            if ev is not None:
                ev.set()

        hooks.on_long_statement = on_long

        if cfg["scenario"] == "copied-context":
            import contextvars as cv

            parents = max(1, cfg["concurrency"] // 5)
            per_parent = max(1, cfg["concurrency"] // parents)

            def parent(i: int) -> None:
                # The request-handling parent: it sets a token, uses the Session,
                # then fans out children that start from a copy of its context.
                token_var.set(f"parent-{i}")
                with setup.scope(f"parent-{i}"):
                    from sqlalchemy import text

                    setup.session().execute(text("SELECT 1"))
                    pool = gevent.pool.Pool(per_parent)
                    while True:
                        item = next_request()
                        if item is None:
                            break
                        g = gevent.Greenlet(dispatch, *item)
                        g.gr_context = cv.copy_context()
                        pool.start(g)
                    pool.join()
                    try:
                        setup.remove()
                    except Exception:
                        pass

            gevent.joinall([gevent.spawn(parent, i) for i in range(parents)])
        else:
            pool = gevent.pool.Pool(cfg["concurrency"])
            while True:
                item = next_request()
                if item is None:
                    break
                pool.spawn(dispatch, *item)
            pool.join()

    elapsed = time.perf_counter() - t0
    # Let cleanup of ended scopes run (gevent: rawlink callbacks and the
    # cleanup greenlet), then look at what is left.
    for _ in range(5):
        gc.collect()
        if runtime == "raw-greenlet":
            assert loop is not None
            loop.run()
        else:
            import gevent

            gevent.sleep(0.01)
    probe = Probe(
        registry=setup.registry_size(),
        checkedout=engine.pool.checkedout(),
        rss_start=rss_start,
        rss_end=proc.memory_info().rss,
        elapsed=elapsed,
        expected=dispatched,
    )
    import dataclasses

    emit("done", probe=dataclasses.asdict(probe))
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
