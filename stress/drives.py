"""How scenarios whose requests are not a plain pool serve them.

Each function here is a :attr:`stress.scenarios.Scenario.serve`: it gets the
cell's runtime and :class:`~stress.runtimes.Cell`, dispatches every request the
cell hands out and returns when all of them (and any unit they started) have
ended. Runtime modules (gevent) are imported inside the functions, so importing
this module is safe before patching.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import time
import typing as t

from . import app as appmod
from .detectors import ERROR, OWNER, Record

if t.TYPE_CHECKING:
    from .runtimes import AsyncSessionRuntime, Cell, GeventRuntime, Runtime


def copied_context(runtime: Runtime, cell: Cell) -> None:
    """Parents set a token, use the Session, then fan out children that start
    from a copy of their context (``gr_context = copy_context()``)."""
    import contextvars

    import gevent
    import gevent.pool
    from sqlalchemy import text

    rt = t.cast("GeventRuntime", runtime)
    parents = max(1, cell.cfg["concurrency"] // 5)
    per_parent = max(1, cell.cfg["concurrency"] // parents)
    setup = cell.setup

    def parent(i: int) -> None:
        cell.token_var.set(f"parent-{i}")
        with setup.scope(f"parent-{i}"):
            setup.session().execute(text("SELECT 1"))
            pool = gevent.pool.Pool(per_parent)
            while (item := cell.next_request()) is not None:
                g = gevent.Greenlet(rt.dispatch, cell, *item)
                g.gr_context = contextvars.copy_context()
                pool.start(g)
            pool.join()
            try:
                setup.remove()
            except Exception:
                pass

    gevent.joinall([gevent.spawn(parent, i) for i in range(parents)])


def orphans(runtime: Runtime, cell: Cell) -> None:
    """Each of ``concurrency`` slots runs its requests one after another in a block
    for the slot's token (``scope("slot-K")``: tokens are reused, never shared by two
    live blocks). Inside its block each request starts a child greenlet with a copy
    of its context; the child runs only after the block has exited, adds one row
    for its request to "the Session" and never commits or removes.

    A safe setup gives the child its own Session (or refuses it) and closes it when
    the child ends; the child's row is never committed. The detector: the row
    committed by a later block (``dup``, ``db_cross``), a later block that starts
    with or sees it (``stale``, ``leaks``), Sessions left in the registry.
    """
    import contextvars

    import gevent
    import gevent.event

    rt = t.cast("GeventRuntime", runtime)
    model = cell.the_app.model
    children: list[t.Any] = []
    refused: collections.Counter[str] = collections.Counter()

    def child(rid: str, block_exited: t.Any) -> None:
        block_exited.wait()  # the slot has left the block and entered its next one
        try:
            obj = model(request_id=rid, payload=f"{rid}/orphan")
            setattr(obj, OWNER, rid)
            cell.setup.session().add(obj)  # no I/O: pending work only
        except Exception as exc:  # a setup may refuse a Session here
            refused[type(exc).__name__] += 1

    exited: dict[str, t.Any] = {}  # request id -> Event set once its block has exited

    def start_child(rec: Record) -> None:
        g = gevent.Greenlet(child, rec.rid, exited[rec.rid])
        g.gr_context = contextvars.copy_context()  # carries the block's token
        g.start()
        children.append(g)

    cell.the_app.in_block = start_child

    def slot(k: int) -> None:
        token = f"slot-{k}"
        while (item := cell.next_request()) is not None:
            ev = exited[item[0]] = gevent.event.Event()
            rt.dispatch(cell, *item, token=token)
            ev.set()

    gevent.joinall([gevent.spawn(slot, k) for k in range(cell.cfg["concurrency"])])
    gevent.joinall(children)
    cell.note("orphans_refused", dict(refused))


def fork(runtime: Runtime, cell: Cell) -> None:
    """Threads serve requests; meanwhile the main thread forks a child now and then,
    while other threads have open transactions (gunicorn ``--preload``,
    multiprocessing's "fork" start method).

    The child uses the registry as a worker would (two requests, each with
    ``remove()``) and exits with ``os._exit``. Its records come back over a pipe
    and count as requests of the cell. The parent's commits are audited like any
    other: rows lost, committed by another transaction, or errors.
    """
    import threading

    requests = cell.cfg["requests"]
    forks = max(2, requests // 30)
    per_child = 2
    wait_s = max(1.0, min(5.0, cell.cfg.get("stall", 10.0) / 2))
    done = [0]
    lock = threading.Lock()

    def worker() -> None:
        while (item := cell.next_request()) is not None:
            rec = appmod.handle(cell.the_app, *item)
            with lock:
                done[0] += 1
            cell.report(rec)

    threads = [threading.Thread(target=worker) for _ in range(cell.cfg["concurrency"])]
    for th in threads:
        th.start()
    for n in range(forks):
        mark = requests * (n + 1) // (forks + 1)
        while done[0] < mark and any(th.is_alive() for th in threads):
            time.sleep(0.0005)
        _warm_up(cell)
        cell.expect(per_child)
        for rec in _fork_child(cell, f"f{n}", per_child, wait_s):
            cell.report(rec)
    for th in threads:
        th.join()


def _warm_up(cell: Cell) -> None:
    """What a gunicorn master does at import with ``--preload``: one query through
    the registry, ``remove()``, and its connection goes back to the pool, where
    the forked worker finds it."""
    from sqlalchemy import text

    with cell.setup.scope("warm-up"):
        try:
            cell.setup.session().execute(text("SELECT 1"))
        finally:
            cell.setup.remove()


def _fork_child(cell: Cell, name: str, n: int, wait_s: float) -> list[Record]:
    """Fork; the child runs ``n`` requests and sends their records back."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into the parent's code
        code = 0
        try:
            os.close(r)
            out = [appmod.handle(cell.the_app, f"{name}-{i}").to_json() for i in range(n)]
            os.write(w, json.dumps(out).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + wait_s
    status: int | None = None
    while time.monotonic() < deadline:
        got, code = os.waitpid(pid, os.WNOHANG)
        if got:
            status = code
            break
        time.sleep(0.002)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    try:
        recs = [Record.from_json(d) for d in json.loads(data)]
    except ValueError:
        recs = []
    if len(recs) < n:  # the child hung or died: what it did not report is an error
        why = "hung" if status is None else f"exited with status {status}"
        for i in range(len(recs), n):
            recs.append(
                Record(
                    rid=f"{name}-{i}",
                    outcome=ERROR,
                    exc="ForkedChildFailed",
                    message=f"forked child {why} before reporting",
                )
            )
    return recs


def gathered(runtime: Runtime, cell: Cell) -> None:
    """Request handlers fan out their work with ``asyncio.gather(...,
    return_exceptions=True)``; each gathered task is one request. A parent sets a
    request-level token (as middleware does) before it gathers, so every child
    starts from a copy of a context that holds it."""
    import asyncio

    rt = t.cast("AsyncSessionRuntime", runtime)
    parents = max(1, cell.cfg["concurrency"] // 5)
    per_parent = max(1, cell.cfg["concurrency"] // parents)

    async def parent(i: int) -> None:
        cell.token_var.set(f"parent-{i}")
        while True:
            batch = [item for _ in range(per_parent) if (item := cell.next_request())]
            if not batch:
                return
            await asyncio.gather(
                *(rt.dispatch(cell, *item) for item in batch), return_exceptions=True
            )

    async def body() -> None:
        await asyncio.gather(*(parent(i) for i in range(parents)))

    rt.run(cell, body)


def threadpool_hop(runtime: Runtime, cell: Cell) -> None:
    """Sync endpoints run in the loop's thread pool (``run_in_executor`` with a copy
    of the request's context, as Starlette and FastAPI do); the request's
    ``remove()`` is called by async middleware in the loop thread, after the
    endpoint returned. The endpoint never removes anything itself."""
    import asyncio
    import contextvars

    app = cell.the_app
    app.removes = False

    async def request(rid: str, plan: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            with cell.setup.scope(rid):  # the middleware's block (token: binds rid)
                ctx = contextvars.copy_context()
                rec = await loop.run_in_executor(None, ctx.run, appmod.handle, app, rid, plan)
                try:
                    cell.setup.remove()  # the middleware's remove(), in the loop thread
                except Exception as exc:
                    appmod._error(rec, exc)
        except Exception as exc:
            rec = Record(rid=rid, plan=plan, rows=app.rows)
            appmod._error(rec, exc)
        cell.report(rec)

    async def worker() -> None:
        while (item := cell.next_request()) is not None:
            await request(*item)

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(cell.cfg["concurrency"])))

    asyncio.run(main())
