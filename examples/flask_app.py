"""A Flask app with one Session per request under gevent.

    python examples/serve_gevent.py flask_app 8000          # gevent.pywsgi
    gunicorn -k gevent --pythonpath examples flask_app:app \\
        -c examples/gunicorn.conf.py                         # or gevent workers

``SessionMiddleware`` wraps ``app.wsgi_app``, so the Session is removed after
the server has closed the response, streamed ones included (with
``stream_with_context``). Without streaming, Flask's own hook does the same
job::

    @app.teardown_appcontext
    def remove_session(exc):
        Session.remove()

``DATABASE_URL`` selects the database (default: the local ``test`` database).
"""

from __future__ import annotations

import os
import typing as t

from flask import Flask, Response, jsonify, request, stream_with_context
from sqlalchemy import Integer, String, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import scoping
from scoping.wsgi import SessionMiddleware

if t.TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.pool import QueuePool

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1/test")


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "scoping_example_notes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rid: Mapped[str] = mapped_column(String(64), index=True)
    body: Mapped[str] = mapped_column(String(200))


engine = create_engine(DATABASE_URL, pool_size=8, max_overflow=4, pool_timeout=20)
Session = scoping.scoped_session(sessionmaker(engine), scope="greenlet")

with engine.begin() as conn:
    conn.execute(text("SELECT pg_advisory_xact_lock(827362)"))
    Base.metadata.create_all(conn)

app = Flask(__name__)
app.wsgi_app = SessionMiddleware(app.wsgi_app, Session)  # type: ignore[method-assign]


@app.post("/notes/<rid>")
def add_note(rid: str) -> Response:
    fresh = not (Session.new or Session.identity_map)
    Session.add(Note(rid=rid, body=request.get_data(as_text=True)[:200]))
    Session.flush()
    notes = Session.scalars(select(Note).where(Note.rid == rid)).all()
    Session.commit()
    return jsonify(rid=rid, fresh=fresh, notes=[n.rid for n in notes])


@app.get("/notes/<rid>/stream")
def stream_notes(rid: str) -> Response:
    ids = Session.scalars(select(Note.id).where(Note.rid == rid)).all()

    def body() -> Iterator[str]:
        for pk in ids:
            note = Session.get(Note, pk)
            yield f"{note.rid if note else None}\n"

    return Response(stream_with_context(body()), mimetype="text/plain")


@app.get("/fail/<rid>")
def fail(rid: str) -> Response:
    Session.add(Note(rid=rid, body="never committed"))
    Session.flush()
    raise RuntimeError(f"request {rid} fails on purpose")


@app.get("/_stats")
def stats() -> Response:
    pool = t.cast("QueuePool", engine.pool)
    return jsonify(registry=len(Session.registry), checkedout=pool.checkedout())
