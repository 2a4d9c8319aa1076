"""The runtimes a cell subprocess can build, and the state of one running cell.

A runtime knows how to patch (or not), which psycopg2 wait callback to install,
how to yield, how to interrupt a request, how to serve requests with
``concurrency`` units, and how to let cleanup of ended scopes run before the
end-of-cell probe. :data:`RUNTIMES` maps a :attr:`stress.scenarios.Scenario.runtime`
to its class. Importing this module imports no gevent: each runtime imports what
it needs when the cell builds it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import threading
import time
import typing as t

if t.TYPE_CHECKING:
    import contextvars

    from . import aioapp
    from . import app as appmod
    from .detectors import Record

# Nothing here imports SQLAlchemy or the app at import time: the worker imports
# this module before it patches (stress.app is imported inside the methods).


_out = sys.stdout


@dataclasses.dataclass
class Cell:
    """One running cell: its configuration, engine, setup, app and request feed."""

    cfg: dict[str, t.Any]
    engine: t.Any
    setup: appmod.Setup
    token_var: contextvars.ContextVar[str]
    app: appmod.App | None = None
    aio_app_: aioapp.AsyncApp | None = None
    dispatched: int = 0
    #: (registry, checked out) when a runtime took the end-of-cell probe itself.
    final: tuple[int | None, int] | None = None
    stop_at: float | None = None
    notes: dict[str, t.Any] = dataclasses.field(default_factory=dict)  # to the JSON
    _plans: t.Iterator[str] | None = None
    _lock: t.Any = None  # made when the cell starts: after patching, never at import

    def start(self) -> None:
        from . import app as appmod

        cfg = self.cfg
        self._plans = appmod.iter_plans(cfg["seed"], cfg["scenario"], cfg["mix"])
        self._lock = threading.Lock()
        duration = cfg.get("duration")
        self.stop_at = time.monotonic() + duration if duration else None

    def next_request(self) -> tuple[str, str] | None:
        """The next ``(request id, plan)``, or None once the cell has run its share."""
        assert self._plans is not None
        with self._lock:
            if self.stop_at is not None:
                if time.monotonic() >= self.stop_at:
                    return None
            elif self.dispatched >= self.cfg["requests"]:
                return None
            i = self.dispatched
            self.dispatched += 1
            return f"r{i}", next(self._plans)

    def expect(self, n: int) -> None:
        """Count ``n`` requests run outside :meth:`next_request` (a forked child's)."""
        with self._lock:
            self.dispatched += n

    def note(self, key: str, value: t.Any) -> None:
        """Record a scenario-specific finding for the cell's JSON (not an anomaly)."""
        self.notes[key] = value

    def report(self, rec: Record) -> None:
        with self._lock:
            emit("req", **rec.to_json())

    @property
    def the_app(self) -> appmod.App:
        assert self.app is not None
        return self.app

    @property
    def aio_app(self) -> aioapp.AsyncApp:
        assert self.aio_app_ is not None
        return self.aio_app_


def emit(event: str, **data: t.Any) -> None:
    """One JSON line on stdout: what the runner outside reads."""
    _out.write(json.dumps({"ev": event, **data}) + "\n")
    _out.flush()


class Runtime:
    """Plain threads, no patching: the base every runtime refines."""

    name = "threads"
    #: Build the engine and registry before the wait callback is installed.
    build_before_driver = False
    #: The cell uses an AsyncEngine and AsyncSessions (stress.aioapp).
    async_engine = False
    #: The planned interruptions this runtime can deliver ("timeout", "kill").
    interrupts: frozenset[str] = frozenset()

    def patch(self) -> None:
        """Patch the process (gevent); nothing here."""

    def install_driver(self, setup: str) -> str:
        """Install the psycopg2 wait callback for this runtime; return its name."""
        return "psycopg2"

    def sleep0(self) -> None:
        time.sleep(0)

    def hooks(self, cfg: dict[str, t.Any], sqlite: bool) -> appmod.Hooks:
        from . import app as appmod

        if sqlite:
            return appmod.sqlite_hooks(self.sleep0)
        return appmod.postgres_hooks(cfg["tag"], cfg["long_seconds"])

    def serve(self, cell: Cell) -> None:
        """Serve every request with ``concurrency`` threads."""
        from . import app as appmod

        def worker() -> None:
            while (item := cell.next_request()) is not None:
                cell.report(appmod.handle(cell.the_app, *item))

        threads = [threading.Thread(target=worker) for _ in range(cell.cfg["concurrency"])]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    def settle(self) -> None:
        """Let cleanup of ended scopes run before the end-of-cell probe."""
        for _ in range(5):
            gc.collect()
            time.sleep(0.01)


class AsyncioRuntime(Runtime):
    """An asyncio loop whose handlers run the sync request through ``asyncio.to_thread``."""

    name = "asyncio"

    def serve(self, cell: Cell) -> None:
        import asyncio

        from . import app as appmod

        async def worker() -> None:
            while (item := cell.next_request()) is not None:
                cell.report(await asyncio.to_thread(appmod.handle, cell.the_app, *item))

        async def main() -> None:
            await asyncio.gather(*(worker() for _ in range(cell.cfg["concurrency"])))

        asyncio.run(main())


class AsyncSessionRuntime(Runtime):
    """An asyncio loop, one task per request, an ``AsyncSession`` on asyncpg.

    Requests planned to be killed are cancelled from outside in the middle of a
    ``pg_sleep``. The end-of-cell probe is taken inside the loop, after cleanup
    ran on it: :func:`asyncio.run` would close what is left on shutdown and hide it.
    """

    name = "asyncio-session"
    async_engine = True
    interrupts = frozenset({"kill"})  # task.cancel() mid-statement

    def __init__(self) -> None:
        self.waiting: dict[str, t.Any] = {}  # request id -> Event set before its long statement
        self.monitor: Monitor | None = None

    def hooks(self, cfg: dict[str, t.Any], sqlite: bool) -> t.Any:
        if not sqlite and cfg["mix"].get("kill"):
            self.monitor = Monitor(cfg["url"], cfg["tag"], threading.Lock())
        return None

    def on_long(self, rid: str) -> None:
        ev = self.waiting.get(rid)
        if ev is not None:
            ev.set()

    async def dispatch(self, cell: Cell, rid: str, plan: str) -> None:
        import asyncio

        from . import aioapp
        from .app import P_KILL

        app = cell.aio_app
        out: dict[str, Record] = {}
        if plan != P_KILL:
            cell.report(await asyncio.create_task(aioapp.handle(app, rid, plan, out)))
            return
        started = self.waiting[rid] = asyncio.Event()
        task = asyncio.create_task(aioapp.handle(app, rid, plan, out))
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not task.done():
            await asyncio.sleep(cell.cfg["kill_after"])
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        self.waiting.pop(rid, None)
        rec = out[rid]
        if self.monitor is not None:
            rec.lingering = self.monitor.running(rid)
        cell.report(rec)

    def run(self, cell: Cell, body: t.Callable[[], t.Awaitable[None]]) -> None:
        """Run ``body`` on a new loop, let cleanup run, probe, then dispose the engine."""
        import asyncio

        async def main() -> None:
            await body()
            for _ in range(5):
                gc.collect()
                await asyncio.sleep(0.02)
            cell.final = (cell.setup.registry_size(), cell.engine.pool.checkedout())
            await cell.engine.dispose()

        asyncio.run(main())

    def serve(self, cell: Cell) -> None:
        async def worker() -> None:
            while (item := cell.next_request()) is not None:
                await self.dispatch(cell, *item)

        async def body() -> None:
            import asyncio

            await asyncio.gather(*(worker() for _ in range(cell.cfg["concurrency"])))

        self.run(cell, body)

    def settle(self) -> None:
        """Nothing: :meth:`run` settled and probed on the loop."""


class GeventRuntime(Runtime):
    """gevent after ``patch_all()``; psycopg2 waits through psycogreen or scoping.green."""

    name = "gevent"
    patch_threads = True
    interrupts = frozenset({"timeout", "kill"})  # gevent.Timeout, Greenlet.kill()

    def __init__(self) -> None:
        self.monitor: Monitor | None = None
        self.waiting: dict[str, t.Any] = {}  # request id -> Event set before its long statement

    def patch(self) -> None:
        from gevent import monkey

        monkey.patch_all(thread=self.patch_threads)

    def install_driver(self, setup: str) -> str:
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

    def sleep0(self) -> None:
        import gevent

        gevent.sleep(0)

    def hooks(self, cfg: dict[str, t.Any], sqlite: bool) -> appmod.Hooks:
        import gevent
        import gevent.lock

        hooks = super().hooks(cfg, sqlite)
        timeout_after = cfg["timeout_after"]
        hooks.timeout = lambda: gevent.Timeout(timeout_after)

        def interrupt_kind(exc: BaseException) -> str | None:
            if isinstance(exc, gevent.Timeout):
                return "timeout"
            if isinstance(exc, gevent.GreenletExit):
                return "killed"
            return None

        hooks.interrupt_kind = interrupt_kind

        def on_long(rid: str) -> None:
            ev = self.waiting.get(rid)
            if ev is not None:
                ev.set()

        hooks.on_long_statement = on_long
        if not sqlite and (cfg["mix"].get("timeout") or cfg["mix"].get("kill")):
            self.monitor = Monitor(cfg["url"], cfg["tag"], gevent.lock.Semaphore())
        return hooks

    def dispatch(self, cell: Cell, rid: str, plan: str, token: str | None = None) -> None:
        """Run one request; a planned kill is delivered from outside mid-statement."""
        import gevent
        import gevent.event

        from . import app as appmod

        the_app = cell.the_app
        if plan != appmod.P_KILL:
            rec = appmod.handle(the_app, rid, plan, token)
        else:
            # handle() calls on_long_statement(rid) right before the statement
            started = self.waiting[rid] = gevent.event.Event()
            g = gevent.spawn(appmod.handle, the_app, rid, plan, token)
            gevent.wait([started, g], count=1)
            if not g.dead:
                gevent.sleep(cell.cfg["kill_after"])
                g.kill(block=True)
            self.waiting.pop(rid, None)
            rec = g.value
        if rec is None:
            return
        if self.monitor is not None and plan in (appmod.P_TIMEOUT, appmod.P_KILL):
            rec.lingering = self.monitor.running(rid)
        cell.report(rec)

    def serve(self, cell: Cell) -> None:
        import gevent.pool

        pool = gevent.pool.Pool(cell.cfg["concurrency"])
        while (item := cell.next_request()) is not None:
            pool.spawn(self.dispatch, cell, *item)
        pool.join()

    def settle(self) -> None:
        import gevent

        for _ in range(5):
            gc.collect()
            gevent.sleep(0.01)


class GeventNoThreadRuntime(GeventRuntime):
    """``patch_all(thread=False)``: greenlets, but :mod:`threading` stays native."""

    name = "gevent-nothread"
    patch_threads = False


class RawGreenletRuntime(Runtime):
    """Raw greenlets on :class:`stress.greenloop.Loop`; nothing patched, no gevent."""

    name = "greenloop"
    build_before_driver = True  # the loop is not running yet: connect first

    def __init__(self) -> None:
        from .greenloop import Loop

        self.loop = Loop()

    def install_driver(self, setup: str) -> str:
        import psycopg2.extensions

        from .greenloop import wait_callback

        psycopg2.extensions.set_wait_callback(wait_callback(self.loop))
        return "stress.greenloop"

    def sleep0(self) -> None:
        self.loop.sleep(0)

    def serve(self, cell: Cell) -> None:
        from . import app as appmod

        def worker() -> None:
            while (item := cell.next_request()) is not None:
                cell.report(appmod.handle(cell.the_app, *item))

        for _ in range(cell.cfg["concurrency"]):
            self.loop.spawn(worker)
        self.loop.run()

    def settle(self) -> None:
        for _ in range(5):
            gc.collect()
            self.loop.run()


class Monitor:
    """Asks the server whether a request's statement is still running."""

    def __init__(self, url: str, tag: str, lock: t.Any) -> None:
        import psycopg2
        from sqlalchemy.engine import make_url

        params = make_url(url).translate_connect_args(username="user", database="dbname")
        self.conn = psycopg2.connect(application_name=f"{tag}-monitor"[:63], **params)
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


RUNTIMES: dict[str, type[Runtime]] = {
    rt.name: rt
    for rt in (
        Runtime,
        AsyncioRuntime,
        AsyncSessionRuntime,
        GeventRuntime,
        GeventNoThreadRuntime,
        RawGreenletRuntime,
    )
}
