"""A plain WSGI app with one Session per request, served by gevent.

Copy it as a starting point. The pieces that matter:

- ``Session = scoping.scoped_session(sessionmaker(engine), scope="greenlet")``:
  gevent servers run each request in its own greenlet;
- ``app = SessionMiddleware(application, Session)``: the Session is removed
  once the server has closed the response, so streaming bodies can use it;
- psycopg2 is made cooperative by ``scoping.green.patch_psycopg2()``, called
  by the server start-up (``examples/gunicorn.conf.py`` or
  ``examples/serve_gevent.py``), never at import.

Serve it::

    gunicorn -c examples/gunicorn.conf.py            # gevent workers
    python examples/serve_gevent.py wsgi_app 8000    # gevent.pywsgi

``DATABASE_URL`` selects the database (default: the local ``test`` database).

Routes (``rid`` is the caller's request id, ``n`` a row count):

- ``/rows?rid=R&n=N``: insert N rows tagged R, read them back, commit, answer JSON;
- ``/stream?rid=R&n=N``: insert and commit N rows, then stream one JSON line per
  row, loading each row through the Session while streaming;
- ``/fail?rid=R``: insert a row, then raise: a 500, and the row is rolled back;
- ``/fail_stream?rid=R``: stream one line, then raise while streaming;
- ``/ticks``: stream up to 10,000 lines, one query each, until the client leaves;
- ``/_stats``: live scopes in the registry, connections checked out, Sessions
  created and closed (and by whom).
"""

from __future__ import annotations

import json
import os
import typing as t
from urllib.parse import parse_qs

import greenlet
from sqlalchemy import Integer, String, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.orm import Session as OrmSession

import scoping
from scoping.wsgi import SessionMiddleware

if t.TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from sqlalchemy.pool import QueuePool

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1/test")


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "scoping_example_rows"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rid: Mapped[str] = mapped_column(String(64), index=True)
    seq: Mapped[int] = mapped_column(Integer)


STATS = {
    "created": 0,
    "closed_by_owner": 0,
    "closed_elsewhere": 0,
    "ticks_completed": 0,
    "ticks_cut": 0,
}


class CountingSession(OrmSession):
    """A Session that counts how it ends: by its own greenlet (the middleware) or not."""

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner = greenlet.getcurrent()
        STATS["created"] += 1

    def close(self) -> None:
        owner = "closed_by_owner" if greenlet.getcurrent() is self.owner else "closed_elsewhere"
        STATS[owner] += 1
        super().close()


engine = create_engine(DATABASE_URL, pool_size=8, max_overflow=4, pool_timeout=20)
Session = scoping.scoped_session(sessionmaker(engine, class_=CountingSession), scope="greenlet")

with engine.begin() as conn:
    # Several workers may start at once: create the table under an advisory lock.
    conn.execute(text("SELECT pg_advisory_xact_lock(827361)"))
    Base.metadata.create_all(conn)


def _json(start_response: StartResponse, body: object, status: str = "200 OK") -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def _fresh() -> bool:
    """True when this request starts with an empty Session (nothing leaked in)."""
    session = Session()
    return not (session.new or session.dirty or session.identity_map)


def rows(rid: str, n: int, start_response: StartResponse) -> list[bytes]:
    fresh = _fresh()
    Session.add_all([Row(rid=rid, seq=i) for i in range(n)])
    Session.flush()
    read = Session.scalars(select(Row).where(Row.rid == rid).order_by(Row.seq)).all()
    in_session = sorted({obj.rid for obj in Session.identity_map.values()})  # type: ignore[attr-defined]
    Session.commit()
    return _json(
        start_response,
        {
            "rid": rid,
            "fresh": fresh,
            "rows": [r.rid for r in read],
            "seqs": [r.seq for r in read],
            "in_session": in_session,
        },
    )


def stream(rid: str, n: int, start_response: StartResponse) -> Iterator[bytes]:
    fresh = _fresh()
    objs = [Row(rid=rid, seq=i) for i in range(n)]
    Session.add_all(objs)
    Session.commit()
    ids = [o.id for o in objs]
    start_response("200 OK", [("Content-Type", "application/x-ndjson")])

    def body() -> Iterator[bytes]:
        # Runs after the app returned: the Session must still be this request's.
        for pk in ids:
            Session.expire_all()
            row = Session.get(Row, pk)
            assert row is not None
            yield json.dumps({"rid": row.rid, "seq": row.seq}).encode() + b"\n"
        yield json.dumps({"done": True, "fresh": fresh}).encode() + b"\n"

    return body()


def fail(rid: str) -> t.NoReturn:
    Session.add(Row(rid=rid, seq=0))
    Session.flush()
    raise RuntimeError(f"request {rid} fails on purpose")


def fail_stream(rid: str, start_response: StartResponse) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "application/x-ndjson")])

    def body() -> Iterator[bytes]:
        Session.add(Row(rid=rid, seq=0))
        Session.flush()
        yield b'{"started": true}\n'
        raise RuntimeError(f"stream {rid} fails on purpose")

    return body()


def ticks(start_response: StartResponse) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body() -> Iterator[bytes]:
        # Uses the Session for every chunk until the client goes away.
        completed = False
        try:
            for _ in range(10_000):
                Session.execute(text("SELECT 1"))
                yield b"tick\n"
            completed = True
        finally:
            STATS["ticks_completed" if completed else "ticks_cut"] += 1

    return body()


def stats(start_response: StartResponse) -> list[bytes]:
    return _json(
        start_response,
        {
            "pid": os.getpid(),
            "registry": len(Session.registry),
            "checkedout": t.cast("QueuePool", engine.pool).checkedout(),
            **STATS,
        },
    )


def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    rid = query.get("rid", "-")
    n = int(query.get("n", "3"))
    if path == "/rows":
        return rows(rid, n, start_response)
    if path == "/stream":
        return stream(rid, n, start_response)
    if path == "/fail":
        fail(rid)
    if path == "/fail_stream":
        return fail_stream(rid, start_response)
    if path == "/ticks":
        return ticks(start_response)
    if path == "/_stats":
        return stats(start_response)
    return _json(start_response, {"error": "not found"}, "404 Not Found")


app = SessionMiddleware(application, Session)
