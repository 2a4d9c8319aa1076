"""The app that ``python -m stress.http`` serves, in one variant per gunicorn run.

A small, realistic Flask app on PostgreSQL. Its routes (``<id>`` is chosen by
the client, so the audit can look every write up afterwards):

- ``POST /items/<id>``: insert a row under ``id`` and commit; 201 after the commit;
- ``GET /items/<id>``: read the row back; 200, or 404 if it is not there;
- ``GET /slow``: ``pg_sleep(0.05)``; 200;
- ``POST /fail/<id>``: insert, flush, then raise: a 500, and nothing may be committed;
- ``POST /timeout/<id>``: insert, flush, then a ``pg_sleep`` under
  ``gevent.Timeout``: a 504, nothing committed, and the statement should end on
  the server (it does with ``scoping.green``; psycogreen leaves it running);
- ``POST /kill/<id>``: a spawned greenlet inserts and runs a long query and is
  killed mid-query; 200 when it is gone. Nothing may be committed.

The variant comes from the JSON file named by ``STRESS_HTTP_CONFIG`` (written
0600 by the harness, so the DSN never appears in argv or the environment):
``orm`` is ``flask-sqlalchemy``, ``sqlalchemy`` (SQLAlchemy's own
``scoped_session`` built at import, removed in teardown) or ``scoping``
(``scoping.scoped_session`` with ``strategy`` and ``SessionMiddleware``).
The module connects once at import (a warm-up query, as many apps do), so with
gunicorn ``--preload`` the master's pool holds a connection when it forks.

Deploying it by hand (for the distributed Locust path)::

    STRESS_HTTP_CONFIG=/path/config.json gunicorn -k gevent -w 4 \\
        -b 0.0.0.0:8000 stress.http.app:app
"""

from __future__ import annotations

import json
import os
import typing as t

import sqlalchemy as sa
from flask import Flask, Response, jsonify, request
from sqlalchemy import orm

CONFIG: dict[str, t.Any]
with open(os.environ["STRESS_HTTP_CONFIG"], encoding="utf-8") as _fh:
    CONFIG = json.load(_fh)

URL: str = CONFIG["url"]
ORM: str = CONFIG["orm"]
STRATEGY: str | None = CONFIG.get("strategy")
TABLE: str = CONFIG.get("table", "items")
#: Marker in the long statements, so the audit can find them in pg_stat_activity.
MARKER = "stress-http-long"
APPLICATION_NAME = "stress-http-app"
ENGINE_OPTIONS: dict[str, t.Any] = {
    "pool_size": 5,
    "max_overflow": 5,
    "pool_timeout": 10,
    "connect_args": {"application_name": APPLICATION_NAME, "connect_timeout": 5},
}

metadata = sa.MetaData()
items = sa.Table(
    TABLE,
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
)


class Item:
    def __init__(self, id: str, kind: str) -> None:
        self.id = id
        self.kind = kind


orm.registry().map_imperatively(Item, items)

app = Flask(__name__)
Session: t.Any

if ORM == "flask-sqlalchemy":
    from flask_sqlalchemy import SQLAlchemy

    app.config["SQLALCHEMY_DATABASE_URI"] = URL
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = ENGINE_OPTIONS
    db = SQLAlchemy(app)
    Session = db.session
    with app.app_context():
        Session.execute(sa.text("SELECT 1"))  # warm-up at import
        Session.remove()
elif ORM == "sqlalchemy":
    engine = sa.create_engine(URL, **ENGINE_OPTIONS)
    Session = orm.scoped_session(orm.sessionmaker(engine))

    @app.teardown_appcontext
    def _remove(exc: BaseException | None) -> None:
        Session.remove()

    with engine.connect() as _conn:
        _conn.execute(sa.text("SELECT 1"))  # warm-up at import
elif ORM == "scoping":
    import scoping
    from scoping.wsgi import SessionMiddleware

    engine = sa.create_engine(URL, **ENGINE_OPTIONS)
    Session = scoping.scoped_session(orm.sessionmaker(engine), scope=STRATEGY or "auto")
    with engine.connect() as _conn:
        _conn.execute(sa.text("SELECT 1"))  # warm-up at import
    inner = SessionMiddleware(app.wsgi_app, Session)
    if STRATEGY == "token":
        # The token strategy needs a bound token: one per request.
        def _tokened(environ: t.Any, start_response: t.Any) -> t.Any:
            with Session.scope(object()):
                result = inner(environ, start_response)
                try:
                    return list(result)
                finally:
                    getattr(result, "close", lambda: None)()

        app.wsgi_app = _tokened  # type: ignore[method-assign]
    else:
        app.wsgi_app = inner  # type: ignore[method-assign]
else:  # pragma: no cover - the harness writes the config
    raise SystemExit(f"unknown orm {ORM!r} in {os.environ['STRESS_HTTP_CONFIG']}")

if CONFIG.get("create_table"):  # deployed by hand (docker-compose.yml); the harness creates it
    with app.app_context():
        _engine = db.engine if ORM == "flask-sqlalchemy" else engine
        with _engine.begin() as _conn:  # several workers may start at once
            _conn.execute(sa.text("SELECT pg_advisory_xact_lock(827363)"))
            metadata.create_all(_conn)


def _long(seconds: float) -> sa.TextClause:
    return sa.text(f"SELECT pg_sleep({seconds:.3f}) /* {MARKER} */")


@app.post("/items/<id>")
def create(id: str) -> tuple[Response, int]:
    Session.add(Item(id, "create"))
    Session.commit()
    return jsonify(id=id), 201


@app.get("/items/<id>")
def read(id: str) -> tuple[Response, int]:
    item = Session.get(Item, id)
    if item is None:
        return jsonify(id=id, found=False), 404
    return jsonify(id=item.id, kind=item.kind), 200


@app.get("/slow")
def slow() -> tuple[Response, int]:
    Session.execute(sa.text("SELECT pg_sleep(0.05)"))
    return jsonify(slept=0.05), 200


@app.post("/fail/<id>")
def fail(id: str) -> Response:
    Session.add(Item(id, "fail"))
    Session.flush()
    raise RuntimeError(f"request {id} fails after flush, on purpose")


@app.post("/timeout/<id>")
def timeout(id: str) -> tuple[Response, int]:
    import gevent

    seconds = min(float(request.args.get("s", CONFIG.get("long_seconds", 0.5))), 5.0)
    Session.add(Item(id, "timeout"))
    Session.flush()
    try:
        with gevent.Timeout(0.05):
            Session.execute(_long(seconds))
    except gevent.Timeout:
        return jsonify(id=id, timed_out=True), 504
    # Only reached when the Timeout could not fire (a driver that blocks the hub).
    Session.rollback()
    return jsonify(id=id, timed_out=False), 200


def _killed_work(id: str, seconds: float) -> None:
    Session.add(Item(id, "kill"))
    Session.flush()
    Session.execute(_long(seconds))
    Session.commit()


@app.post("/kill/<id>")
def kill(id: str) -> tuple[Response, int]:
    import gevent

    seconds = float(CONFIG.get("long_seconds", 0.5))

    def work() -> None:
        # A spawned greenlet starts with an empty context: give it what a real
        # background job would set up (an app context; a token for "token").
        with app.app_context():
            if STRATEGY == "token" and ORM == "scoping":
                with Session.scope(object()):
                    _killed_work(id, seconds)
            else:
                _killed_work(id, seconds)

    worker = gevent.spawn(work)
    gevent.sleep(0.03)
    worker.kill(block=True, timeout=5)
    return jsonify(id=id, killed=worker.dead), 200
