"""gunicorn ``--preload`` with gevent workers, for real (issue 11, part 2).

The app builds its engine and ``scoping.scoped_session`` in the master, before
gevent patches anything, and runs a warm-up query at import, so the master's
pool holds a connection when it forks two workers. With
``examples/gunicorn.conf.py`` (its ``post_worker_init`` runs
``scoping.doctor.check()``): every request succeeds, and the backends that
served the workers are neither the master's nor each other's.

The naive app (a plain ``sessionmaker`` on an engine that the master
connected) is stopped at boot by the same doctor, which names the inherited
pooled connection.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import typing as t
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(os.path.abspath(__file__)).parent.parent
CONF = ROOT / "examples" / "gunicorn.conf.py"

PREFORK_APP = '''
"""Built in the gunicorn master (--preload), before gevent.monkey.patch_all()."""
import json, os
import sqlalchemy as sa
from sqlalchemy import orm
import scoping
from scoping.wsgi import SessionMiddleware

with open(os.environ["PREFORK_CONFIG"], encoding="utf-8") as fh:
    URL = json.load(fh)["url"]
engine = sa.create_engine(URL, pool_size=5, max_overflow=5)
if os.environ.get("PREFORK_NAIVE"):
    Session = orm.sessionmaker(engine)          # per request, by hand; nothing knows the fork
else:
    Session = scoping.scoped_session(orm.sessionmaker(engine), scope="greenlet")
with engine.connect() as conn:                  # warm-up query at import: the master's pool
    BACKEND = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
MASTER = {"pid": os.getpid(), "backend": BACKEND}


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/master":
        body = MASTER
    else:
        rid = path.strip("/")
        Session.execute(sa.text("INSERT INTO prefork_rows (id) VALUES (:id)"), {"id": rid})
        backend = Session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        Session.execute(sa.text("SELECT pg_sleep(0.01)"))
        Session.commit()
        body = {"pid": os.getpid(), "backend": backend}
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [data]


app = SessionMiddleware(application, Session) if hasattr(Session, "registry") else application
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, dict[str, t.Any] | None]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except OSError:
        return 0, None


def _query(dsn: str, sql: str) -> list[tuple[t.Any, ...]]:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


@contextlib.contextmanager
def _gunicorn(
    tmp_path: Path, pg_url: str, *, naive: bool, workers: int = 2
) -> t.Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    (tmp_path / "prefork_app.py").write_text(PREFORK_APP)
    config = tmp_path / "config.json"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"url": pg_url}, fh)  # the DSN never goes through argv
    port = _free_port()
    env = dict(
        os.environ,
        PREFORK_CONFIG=str(config),
        APP="prefork_app:app",
        PRELOAD="1",
        BIND=f"127.0.0.1:{port}",
        WEB_CONCURRENCY=str(workers),
        XDG_RUNTIME_DIR=str(tmp_path),
    )
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(tmp_path), str(ROOT), env.get("PYTHONPATH")])
    )
    if naive:
        env["PREFORK_NAIVE"] = "1"
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(CONF), "--graceful-timeout", "2"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc, port, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.slow
@pytest.mark.gevent
def test_preload_workers_never_share_the_masters_connections(tmp_path: Path, pg_url: str) -> None:
    dsn = "postgresql://" + pg_url.split("://", 1)[1]
    _query(dsn, "DROP TABLE IF EXISTS prefork_rows")
    _query(dsn, "CREATE TABLE prefork_rows (id text PRIMARY KEY)")
    with _gunicorn(tmp_path, pg_url, naive=False) as (proc, port, log_path):
        deadline = time.monotonic() + 60
        while log_path.read_text().count("scoping doctor: ") < 2:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.1)
        status, master = _get(port, "/master")
        assert status == 200
        assert master is not None
        ids = [f"r{i}" for i in range(300)]
        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(lambda rid: _get(port, f"/{rid}"), ids))
        log = log_path.read_text()
    failures = [a for a in answers if a[0] != 200]
    assert failures == [], log[-4000:]
    served = [t.cast("dict[str, t.Any]", body) for _, body in answers]
    by_worker: dict[int, set[int]] = {}
    for body in served:
        by_worker.setdefault(body["pid"], set()).add(body["backend"])
    assert master["pid"] not in by_worker
    assert len(by_worker) == 2, by_worker  # both workers served
    first, second = by_worker.values()
    assert not first & second  # the workers never share a backend
    assert master["backend"] not in first | second  # nor use the master's connection
    assert len(_query(dsn, "SELECT id FROM prefork_rows")) == len(ids)
    assert "Traceback" not in log, log[-4000:]


@pytest.mark.slow
@pytest.mark.gevent
def test_doctor_stops_a_worker_that_inherited_a_pooled_connection(
    tmp_path: Path, pg_url: str
) -> None:
    # One worker: when two fail to boot at once, gunicorn's master can raise
    # HaltServer again while halting for the first and exit 1 instead of 3.
    with _gunicorn(tmp_path, pg_url, naive=True, workers=1) as (proc, _port, log_path):
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("gunicorn kept running: " + log_path.read_text()[-4000:])
    log = log_path.read_text()
    assert proc.returncode == 3, log[-4000:]  # gunicorn's "Worker failed to boot"
    assert "scoping.doctor.UnsafeProcess: 1 Session-scoping hazard(s)" in log, log[-4000:]
    assert "- prefork_app.engine: 1 pooled connection(s) were opened by another process" in log, (
        log[-4000:]
    )
