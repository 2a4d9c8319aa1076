"""scoping.asgi under a real uvicorn server, over real HTTP (httpx), on real PostgreSQL.

One FastAPI app mixes ``async def`` endpoints (AsyncSession, asyncpg or
psycopg 3 async) and sync endpoints run in the threadpool (Session,
psycopg2), ``asyncio.to_thread`` calls, a streaming response, raising
handlers, background tasks and clients that disconnect mid-stream. Each
request inserts rows tagged with its id and flushes them (visible only in its
own transaction), then reads back every uncommitted-looking row it can see:
exactly its own rows, or Sessions were mixed.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import sys
import threading
import time
import typing as t

import pytest
from sqlalchemy import Boolean, String, create_engine, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import scoping
from scoping.asgi import RequestScope, SessionMiddleware, current_phase
from scoping.asyncio import async_scoped_session

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
fastapi = pytest.importorskip("fastapi")

from contextlib import asynccontextmanager  # noqa: E402

from fastapi import BackgroundTasks, FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

DRIVERS = ["asyncpg", "psycopg"]


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "h6_asgi_rows"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    rid: Mapped[str] = mapped_column(String(40), index=True)
    done: Mapped[bool] = mapped_column(Boolean, default=False)


class Tracked:
    """Every Session made, by serial number, and how often each was closed.

    A serial, not ``id()``: a closed Session is freed and its id can be a later
    Session's, whose close would then count as a second one.
    """

    def __init__(self) -> None:
        self.closes: dict[int, int] = {}
        self.lock = threading.Lock()
        self.serials = itertools.count()

    def made(self, session: t.Any) -> None:
        with self.lock:
            session.tracked_serial = serial = next(self.serials)
            self.closes[serial] = 0

    def closed(self, session: t.Any) -> None:
        with self.lock:
            serial = session.tracked_serial
            self.closes[serial] = self.closes.get(serial, 0) + 1


TRACK = Tracked()


class TrackedAsyncSession(AsyncSession):
    def __init__(self, *a: t.Any, **kw: t.Any) -> None:
        super().__init__(*a, **kw)
        TRACK.made(self)

    async def close(self) -> None:
        # Counted once finished: a close interrupted by a cancel (a client
        # that disconnects while the last chunk's Session closes) is finished
        # by scoping's cleanup task, which calls close() again.
        await super().close()
        TRACK.closed(self)


class TrackedSession(Session):
    def __init__(self, *a: t.Any, **kw: t.Any) -> None:
        super().__init__(*a, **kw)
        TRACK.made(self)

    def close(self) -> None:
        super().close()
        TRACK.closed(self)


def build_app(  # noqa: C901, PLR0915 - one app, its endpoints side by side
    aengine: t.Any, sengine: t.Any
) -> tuple[t.Any, t.Any, t.Any, dict[str, t.Any]]:
    ASession = async_scoped_session(
        async_sessionmaker(aengine, class_=TrackedAsyncSession), scope=RequestScope()
    )
    SSession = scoping.scoped_session(
        sessionmaker(sengine, class_=TrackedSession), scope=RequestScope()
    )
    seen: dict[str, t.Any] = {"bg": {}, "bg_request_sessions": {}, "alive": []}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> t.AsyncIterator[None]:
        yield
        await aengine.dispose()  # on the server's loop, which owns the connections

    api = FastAPI(lifespan=lifespan)

    async def own_rows(rid: str) -> list[str]:
        ASession.add_all([Row(rid=rid), Row(rid=rid)])
        await ASession.flush()
        await asyncio.sleep(random.random() / 100)
        return list((await ASession.scalars(select(Row.rid).where(Row.done.is_(False)))).all())

    def own_rows_sync(rid: str) -> list[str]:
        SSession.add_all([Row(rid=rid), Row(rid=rid)])
        SSession.flush()
        time.sleep(random.random() / 100)
        return list(SSession.scalars(select(Row.rid).where(Row.done.is_(False))).all())

    async def finish(rid: str) -> None:
        await ASession.execute(update(Row).where(Row.rid == rid).values(done=True))
        await ASession.commit()

    def finish_sync(rid: str) -> None:
        SSession.execute(update(Row).where(Row.rid == rid).values(done=True))
        SSession.commit()

    @api.get("/async/{rid}")
    async def async_endpoint(rid: str) -> dict[str, t.Any]:
        rows = await own_rows(rid)
        await finish(rid)
        return {"rows": rows}

    @api.get("/sync/{rid}")
    def sync_endpoint(rid: str) -> dict[str, t.Any]:
        rows = own_rows_sync(rid)
        finish_sync(rid)
        return {"rows": rows}

    @api.get("/hop/{rid}")
    async def hop_endpoint(rid: str) -> dict[str, t.Any]:
        # The database work is one thread call: a pooled connection held
        # across awaits of a bounded executor can deadlock any app.
        def work() -> list[str]:
            rows = own_rows_sync(rid)
            finish_sync(rid)
            return rows

        first = await asyncio.to_thread(lambda: id(SSession()))
        rows = await asyncio.to_thread(work)
        second = await asyncio.to_thread(lambda: id(SSession()))
        return {"rows": rows, "same": first == second}

    @api.get("/fail/{rid}")
    async def failing(rid: str) -> None:
        await own_rows(rid)
        raise RuntimeError(f"boom {rid}")

    @api.get("/failsync/{rid}")
    def failing_sync(rid: str) -> None:
        own_rows_sync(rid)
        raise RuntimeError(f"boom {rid}")

    @api.get("/stream/{rid}")
    async def stream(rid: str, chunks: int = 3, pause: float = 0.0) -> StreamingResponse:
        rows = await own_rows(rid)

        async def body() -> t.AsyncIterator[bytes]:
            for i in range(chunks):
                again = (await ASession.scalars(select(Row.rid).where(Row.done.is_(False)))).all()
                yield f"{','.join(again)}|{i}\n".encode()
                await asyncio.sleep(pause)
            await finish(rid)
            yield f"rows:{','.join(rows)}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    @api.get("/bg/{rid}")
    async def with_background(rid: str, tasks: BackgroundTasks) -> dict[str, t.Any]:
        rows = await own_rows(rid)
        request_session = ASession()
        seen["bg_request_sessions"][rid] = id(request_session)
        seen["alive"].append(request_session)  # no id is reused while the test compares them
        await finish(rid)

        async def background() -> None:
            session = ASession()
            seen["bg"][rid] = (id(session), repr(current_phase()))
            seen["alive"].append(session)
            session.add(Row(rid=f"{rid}-bg", done=True))
            await session.commit()

        tasks.add_task(background)
        return {"rows": rows}

    @api.exception_handler(RuntimeError)
    async def on_error(request: Request, exc: RuntimeError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=500)

    app = SessionMiddleware(api, ASession, SSession)
    return app, ASession, SSession, seen


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, app: t.Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="error", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


KINDS = ["async", "sync", "hop", "fail", "failsync", "stream", "bg", "disconnect"]


async def one(client: t.Any, base: str, kind: str, rid: str) -> dict[str, t.Any]:
    if kind == "disconnect":
        async with client.stream("GET", f"{base}/stream/{rid}?chunks=50&pause=0.02") as resp:
            async for _chunk in resp.aiter_raw():
                break  # leave after the first chunk: the client disconnects
        return {"kind": kind, "rid": rid}
    if kind == "stream":
        resp = await client.get(f"{base}/stream/{rid}")
        lines = resp.text.strip().splitlines()
        return {
            "kind": kind,
            "rid": rid,
            "status": resp.status_code,
            "rows": lines[-1].removeprefix("rows:").split(","),
            "chunks": [line.split("|")[0].split(",") for line in lines[:-1]],
        }
    resp = await client.get(f"{base}/{kind}/{rid}")
    return {"kind": kind, "rid": rid, "status": resp.status_code, "body": resp.json()}


def run_requests(base: str, n: int) -> list[dict[str, t.Any]]:
    async def main() -> list[dict[str, t.Any]]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            jobs = [one(client, base, KINDS[i % len(KINDS)], f"r{i}") for i in range(n)]
            return await asyncio.gather(*jobs)

    return asyncio.run(main())


def check_results(results: list[dict[str, t.Any]]) -> None:
    for res in results:
        kind, rid = res["kind"], res["rid"]
        if kind == "disconnect":
            continue
        if kind in ("fail", "failsync"):
            assert res["status"] == 500, res
            continue
        assert res["status"] == 200, res
        rows = res["rows"] if kind == "stream" else res["body"]["rows"]
        assert rows == [rid, rid], res  # only its own rows: no shared Session
        if kind == "stream":
            assert all(chunk == [rid, rid] for chunk in res["chunks"]), res
        if kind == "hop":
            assert res["body"]["same"], res


def wait_until(condition: t.Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def run_app(pg_url: str, driver: str, n: int) -> None:
    url = make_url(pg_url)
    sengine = create_engine(url, pool_size=10, max_overflow=0, pool_timeout=60)
    aengine = create_async_engine(
        url.set(drivername=f"postgresql+{driver}"), pool_size=10, max_overflow=5, pool_timeout=60
    )
    with sengine.begin() as conn:
        Base.metadata.drop_all(conn)
        Base.metadata.create_all(conn)
    TRACK.closes.clear()
    app, ASession, SSession, seen = build_app(aengine, sengine)
    try:
        with Server(app) as base:
            results = run_requests(base, n)
            wait_until(
                lambda: (
                    len(ASession.registry) == 0
                    and len(SSession.registry) == 0
                    and aengine.sync_engine.pool.checkedout() == 0
                    and sengine.pool.checkedout() == 0
                )
            )
            assert len(ASession.registry) == 0
            assert ASession.registry.pending() == 0
            assert len(SSession.registry) == 0
            assert aengine.sync_engine.pool.checkedout() == 0
            assert sengine.pool.checkedout() == 0
        check_results(results)
        with sengine.connect() as conn:
            committed = set(conn.scalars(text("select rid from h6_asgi_rows")).all())
            assert conn.scalar(text("select count(*) from h6_asgi_rows where not done")) == 0
        # A client that disconnects mid-stream is not a failure of the handler:
        # the app may or may not notice before it commits (rows are then all
        # done, never half-committed: checked above). Raising handlers are.
        failed = {r["rid"] for r in results if r["kind"] in ("fail", "failsync")}
        assert not (committed & failed), sorted(committed & failed)  # no failed request committed
        ok = {r["rid"] for r in results if r["kind"] not in ("fail", "failsync", "disconnect")}
        assert ok <= committed
        # every background task had its own Session, in its own scope, and it was closed
        bg = {r["rid"] for r in results if r["kind"] == "bg"}
        assert set(seen["bg"]) == bg
        assert {f"{rid}-bg" for rid in bg} <= committed
        bg_ids = [session_id for session_id, _ in seen["bg"].values()]
        assert len(set(bg_ids)) == len(bg_ids)
        assert not set(bg_ids) & set(seen["bg_request_sessions"].values())
        assert all("(background)" in phase for _, phase in seen["bg"].values())
        # every Session made was closed, and each close finished exactly once
        assert TRACK.closes
        assert set(TRACK.closes.values()) == {1}, TRACK.closes
    finally:
        with sengine.begin() as conn:
            Base.metadata.drop_all(conn)
        sengine.dispose()


@pytest.mark.parametrize("driver", DRIVERS)
def test_uvicorn_small(pg_url: str, driver: str) -> None:
    run_app(pg_url, driver, n=40)


@pytest.mark.slow
@pytest.mark.parametrize("driver", DRIVERS)
def test_uvicorn_300_concurrent_requests(pg_url: str, driver: str) -> None:
    run_app(pg_url, driver, n=300)


# -- construction and the strategy outside requests ------------------------------


def test_middleware_refuses_sessions_not_keyed_by_the_request() -> None:
    async def app(scope: t.Any, receive: t.Any, send: t.Any) -> None:
        raise AssertionError

    with pytest.raises(TypeError, match="at least one"):
        SessionMiddleware(app)
    with pytest.raises(TypeError, match="RequestScope"):
        SessionMiddleware(app, scoping.scoped_session(sessionmaker()))
    with pytest.raises(TypeError, match="remove"):
        SessionMiddleware(app, object())


def test_request_scope_outside_a_request_is_its_fallback() -> None:
    strategy = RequestScope()
    assert current_phase() is None
    assert strategy.current() == scoping.AutoScope().current()

    async def inside() -> tuple[object, object]:
        return strategy.current(), strategy.fallback.current()

    in_task, fallback_in_task = asyncio.run(inside())
    assert in_task == fallback_in_task != strategy.current()  # the task's own Context


def test_lifespan_passes_through() -> None:
    calls: list[str] = []

    async def app(scope: t.Any, receive: t.Any, send: t.Any) -> None:
        calls.append(scope["type"])
        assert current_phase() is None

    middleware = SessionMiddleware(
        app, scoping.scoped_session(sessionmaker(), scope=RequestScope())
    )
    asyncio.run(middleware({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert calls == ["lifespan"]


# -- the examples, served by uvicorn ------------------------------------------------


def load_example(name: str, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> t.Any:
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("DATABASE_URL", pg_url)
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # annotations resolve through it
    spec.loader.exec_module(module)
    return module


def test_fastapi_example(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    example = load_example("fastapi_app", pg_url, monkeypatch)
    with Server(example.app) as base, httpx.Client(base_url=base, timeout=30) as client:
        ids = [client.post("/notes", params={"text": f"n{i}"}).json()["id"] for i in range(3)]
        assert len(set(ids)) == 3
        assert client.get("/notes").json()[-3:] == ["n0", "n1", "n2"]
        assert client.get("/notes/count").json()["count"] >= 3
        assert client.get("/notes/stream").text.splitlines()[-3:] == ["n0", "n1", "n2"]
        wait_until(
            lambda: (
                len(example.Session.registry) == 0
                and example.engine.sync_engine.pool.checkedout() == 0
            )
        )
        assert len(example.Session.registry) == 0
        assert len(example.SyncSession.registry) == 0
        assert example.engine.sync_engine.pool.checkedout() == 0
        assert example.sync_engine.pool.checkedout() == 0
    with example.sync_engine.begin() as conn:
        example.Base.metadata.drop_all(conn)
    example.sync_engine.dispose()


def test_starlette_example(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    example = load_example("starlette_app", pg_url, monkeypatch)
    with Server(example.app) as base, httpx.Client(base_url=base, timeout=30) as client:
        first, second = client.get("/now").json(), client.get("/now").json()
        assert first["now"]
        assert second["now"]
        assert client.get("/fail").status_code == 500
        wait_until(
            lambda: (
                len(example.Session.registry) == 0
                and example.engine.sync_engine.pool.checkedout() == 0
            )
        )
        assert len(example.Session.registry) == 0
        assert example.engine.sync_engine.pool.checkedout() == 0
