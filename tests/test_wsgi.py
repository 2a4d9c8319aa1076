"""scoping.wsgi.SessionMiddleware: unit tests in-process, then real servers over HTTP.

The end-to-end tests start examples/wsgi_app.py (and examples/flask_app.py)
under gevent.pywsgi and gunicorn's gevent worker in subprocesses, on a free
loopback port, and send them concurrent requests from a thread pool in the
pytest process (no gevent here).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import http.client
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
import typing as t
import uuid
import wsgiref.util
import wsgiref.validate

import pytest
from sqlalchemy import text

from scoping.wsgi import SessionMiddleware
from tests._subproc import ROOT

if t.TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterable, Iterator

    import sqlalchemy

# --------------------------------------------------------------------------
# Unit tests: a fake scoped session that counts remove() calls.
# --------------------------------------------------------------------------


class FakeScoped:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.removed = 0
        self.fail = fail

    def remove(self) -> None:
        self.removed += 1
        if self.fail is not None:
            raise self.fail


def _environ() -> dict[str, t.Any]:
    environ: dict[str, t.Any] = {}
    wsgiref.util.setup_testing_defaults(environ)
    return environ


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: t.Any = None) -> t.Any:
    return lambda data: None


def _list_app(environ: t.Any, start_response: t.Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


class Events:
    def __init__(self) -> None:
        self.log: list[str] = []


def _streaming_app(events: Events, session: FakeScoped, chunks: int = 3) -> t.Any:
    def app(environ: t.Any, start_response: t.Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            try:
                for i in range(chunks):
                    # The Session must still be there while the body is produced.
                    events.log.append(f"chunk{i} removed={session.removed}")
                    yield b"x"
            finally:
                events.log.append(f"body closed removed={session.removed}")

        return body()

    return app


def test_list_body_removed_on_close_and_keeps_len() -> None:
    s = FakeScoped()
    result = SessionMiddleware(_list_app, s)(_environ(), _start_response)
    assert len(result) == 1  # type: ignore[arg-type]  # servers use it for Content-Length
    assert list(result) == [b"hello"]
    assert s.removed == 0
    result.close()  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]  # idempotent
    assert s.removed == 1


def test_streaming_body_consumed_then_closed() -> None:
    s, ev = FakeScoped(), Events()
    result = SessionMiddleware(_streaming_app(ev, s), s)(_environ(), _start_response)
    assert b"".join(result) == b"xxx"
    assert s.removed == 0
    result.close()  # type: ignore[attr-defined]
    assert s.removed == 1
    assert ev.log == [
        "chunk0 removed=0",
        "chunk1 removed=0",
        "chunk2 removed=0",
        "body closed removed=0",
    ]


def test_streaming_closed_early_like_a_client_disconnect() -> None:
    s, ev = FakeScoped(), Events()
    result = SessionMiddleware(_streaming_app(ev, s, chunks=10), s)(_environ(), _start_response)
    it = iter(result)
    assert next(it) == b"x"
    result.close()  # type: ignore[attr-defined]
    # The generator was closed first (its finally ran), then the Session removed.
    assert ev.log == ["chunk0 removed=0", "body closed removed=0"]
    assert s.removed == 1


def test_app_raising_removes_and_propagates() -> None:
    s = FakeScoped()

    def app(environ: t.Any, start_response: t.Any) -> Iterable[bytes]:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        SessionMiddleware(app, s)(_environ(), _start_response)
    assert s.removed == 1


def test_app_raising_is_not_masked_by_a_failing_remove(caplog: pytest.LogCaptureFixture) -> None:
    s1, s2 = FakeScoped(RuntimeError("remove failed")), FakeScoped()

    def app(environ: t.Any, start_response: t.Any) -> Iterable[bytes]:
        raise ValueError("original")

    with (
        caplog.at_level(logging.ERROR, logger="scoping.wsgi"),
        pytest.raises(ValueError, match="original"),
    ):
        SessionMiddleware(app, s1, s2)(_environ(), _start_response)
    assert (s1.removed, s2.removed) == (1, 1)  # the second one is removed all the same
    assert "remove failed" in caplog.text


def test_iterator_raising_then_server_closes(caplog: pytest.LogCaptureFixture) -> None:
    s = FakeScoped(RuntimeError("remove failed"))

    def app(environ: t.Any, start_response: t.Any) -> Iterator[bytes]:
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            yield b"a"
            raise ValueError("while streaming")

        return body()

    result = SessionMiddleware(app, s)(_environ(), _start_response)
    with pytest.raises(ValueError, match="while streaming"):
        for _ in result:
            pass
    assert s.removed == 0
    with caplog.at_level(logging.ERROR, logger="scoping.wsgi"):
        result.close()  # type: ignore[attr-defined]  # as the server does; logs, no raise
    assert s.removed == 1
    assert "remove failed" in caplog.text


def test_iterable_without_close_and_remove_error_on_normal_path() -> None:
    class Body:
        def __iter__(self) -> Iterator[bytes]:
            return iter([b"a", b"b"])

    s = FakeScoped(RuntimeError("remove failed"))

    def app(environ: t.Any, start_response: t.Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return Body()

    result = SessionMiddleware(app, s)(_environ(), _start_response)
    assert list(result) == [b"a", b"b"]
    # Nothing to mask: the removal error reaches the server, which logs it.
    with pytest.raises(RuntimeError, match="remove failed"):
        result.close()  # type: ignore[attr-defined]
    assert s.removed == 1


def test_close_error_is_not_masked_by_remove_error() -> None:
    class Body:
        def __iter__(self) -> Iterator[bytes]:
            return iter([b"a"])

        def close(self) -> None:
            raise OSError("close failed")

    s = FakeScoped(RuntimeError("remove failed"))

    def app(environ: t.Any, start_response: t.Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return Body()

    result = SessionMiddleware(app, s)(_environ(), _start_response)
    list(result)
    with pytest.raises(OSError, match="close failed"):
        result.close()  # type: ignore[attr-defined]
    assert s.removed == 1


def test_file_wrapper_is_returned_unwrapped() -> None:
    class FileWrapper:
        def __init__(self, data: bytes) -> None:
            self.data = data
            self.closed = False

        def __iter__(self) -> Iterator[bytes]:
            return iter([self.data])

        def close(self) -> None:
            self.closed = True

    s = FakeScoped()
    wrapper = FileWrapper(b"file")

    def app(environ: t.Any, start_response: t.Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return wrapper

    environ = _environ()
    environ["wsgi.file_wrapper"] = FileWrapper
    result = SessionMiddleware(app, s)(environ, _start_response)
    assert result is wrapper  # the server still sees its own FileWrapper (sendfile)
    result.close()
    assert wrapper.closed is True
    assert s.removed == 1


def test_passes_wsgiref_validator() -> None:
    """PEP 3333 conformance as checked by wsgiref.validate (its warnings are errors here)."""
    s, ev = FakeScoped(), Events()
    app = wsgiref.validate.validator(SessionMiddleware(_streaming_app(ev, s), s))
    environ = _environ()
    environ["QUERY_STRING"] = ""
    result = app(environ, _start_response)
    assert b"".join(result) == b"xxx"
    result.close()  # type: ignore[attr-defined]
    assert s.removed == 1


def test_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="at least one scoped session"):
        SessionMiddleware(_list_app)
    with pytest.raises(TypeError, match="no remove"):
        SessionMiddleware(_list_app, object())  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# End to end: real servers, real HTTP, PostgreSQL.
# --------------------------------------------------------------------------

EXAMPLES = os.path.join(ROOT, "examples")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def _serve(kind: str, module: str, pg_url: str, log_path: str) -> Iterator[int]:
    """Start an example app server on a free loopback port; kill it at the end."""
    port = _free_port()
    if kind == "pywsgi":
        cmd = [sys.executable, os.path.join(EXAMPLES, "serve_gevent.py"), module, str(port)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            os.path.join(EXAMPLES, "gunicorn.conf.py"),
            "-b",
            f"127.0.0.1:{port}",
            "-w",
            "1",
            "--graceful-timeout",
            "2",
            f"{module}:app",
        ]
    env = dict(os.environ, DATABASE_URL=pg_url)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    log = open(log_path, "w+b")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"{kind} server exited: {log.read().decode()[-4000:]}")
            try:
                # Ready when the app answers (gunicorn accepts before its worker booted).
                if _get(port, "/_stats", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{kind} server not ready after 30 s"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _get(
    port: int, path: str, timeout: float = 30, method: str = "GET", body: bytes | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _disconnect_early(port: int, path: str) -> bytes:
    """Read the first bytes of a streamed response, then reset the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        first = sock.recv(64)
        # RST instead of FIN: the server's next write fails at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return first


def _wait_idle(port: int) -> dict[str, t.Any]:
    """Poll /_stats until no request holds a Session or a connection (10 s bound).

    The server removes a request's Session after sending its last byte, so the
    client can finish first; this waits for those last few removals.
    """
    deadline = time.monotonic() + 10
    while True:
        stats: dict[str, t.Any] = json.loads(_get(port, "/_stats")[1])
        if (stats["registry"], stats["checkedout"]) == (0, 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def _one_request(port: int, kind: str, rid: str) -> tuple[str, str, t.Any]:
    """Send one request of the given kind; return (kind, outcome, detail)."""
    try:
        if kind == "rows":
            status, body = _get(port, f"/rows?rid={rid}&n=3")
            data: t.Any = json.loads(body) if status == 200 else body
            ok = (
                status == 200
                and data["rows"] == [rid] * 3
                and data["seqs"] == [0, 1, 2]
                and data["fresh"] is True
                and data["in_session"] == [rid]
            )
            return kind, "ok" if ok else "bad", (status, data)
        if kind == "stream":
            status, body = _get(port, f"/stream?rid={rid}&n=5")
            lines = [json.loads(x) for x in body.splitlines()]
            ok = (
                status == 200
                and lines[:-1] == [{"rid": rid, "seq": i} for i in range(5)]
                and lines[-1] == {"done": True, "fresh": True}
            )
            return kind, "ok" if ok else "bad", (status, lines)
        if kind == "fail":
            status, body = _get(port, f"/fail?rid={rid}")
            return kind, "500" if status == 500 else "bad", status
        if kind == "fail_stream":
            try:
                status, body = _get(port, f"/fail_stream?rid={rid}")
            except (http.client.HTTPException, ConnectionError) as exc:
                return kind, "cut", type(exc).__name__
            return kind, "bad", (status, body)
        assert kind == "disconnect"
        first = _disconnect_early(port, f"/ticks?rid={rid}")
        return kind, "ok" if first.startswith(b"HTTP/1.1 200") else "bad", first
    except Exception as exc:  # a request that failed unexpectedly
        return kind, "error", repr(exc)


# 300 requests: 180 rows, 60 streams, 30 deliberate 500s, 15 streams that
# raise mid-body, 15 client disconnects during a stream.
PLAN = (["rows"] * 6 + ["stream"] * 2 + ["fail"]) * 30 + ["fail_stream", "disconnect"] * 15
EXPECTED_OUTCOMES = {
    ("rows", "ok"): 180,
    ("stream", "ok"): 60,
    ("fail", "500"): 30,
    ("fail_stream", "cut"): 15,
    ("disconnect", "ok"): 15,
}


@pytest.mark.gevent
@pytest.mark.slow
@pytest.mark.parametrize("server", ["pywsgi", "gunicorn"])
def test_wsgi_app_under_concurrent_load(
    server: str, pg_url: str, pg_engine: sqlalchemy.Engine, tmp_path: pathlib.Path
) -> None:
    pytest.importorskip("gunicorn" if server == "gunicorn" else "gevent")
    run = uuid.uuid4().hex[:8]
    log_path = tmp_path / f"{server}.log"
    with _serve(server, "wsgi_app", pg_url, str(log_path)) as port:
        with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
            futures = [
                pool.submit(_one_request, port, kind, f"{run}-{i}") for i, kind in enumerate(PLAN)
            ]
            results = [f.result(timeout=60) for f in futures]
        stats = _wait_idle(port)
    server_log = log_path.read_text(errors="replace")

    outcomes = collections.Counter((kind, outcome) for kind, outcome, _ in results)
    unexpected = [r for r in results if (r[0], r[1]) not in EXPECTED_OUTCOMES][:5]
    assert dict(outcomes) == EXPECTED_OUTCOMES, unexpected
    # Every Session was removed by its own request's greenlet (the middleware),
    # none left to the end-of-greenlet cleanup; nothing left checked out.
    assert stats["registry"] == 0
    assert stats["checkedout"] == 0
    assert stats["created"] == len(PLAN)
    assert stats["closed_by_owner"] == len(PLAN)
    assert stats["closed_elsewhere"] == 0
    # Every disconnected stream was closed by the server before its end.
    assert (stats["ticks_cut"], stats["ticks_completed"]) == (15, 0)
    # Server side, the only tracebacks are the 45 deliberate failures.
    assert server_log.count("Traceback") == 45, server_log[-3000:]
    if server == "gunicorn":
        # examples/gunicorn.conf.py ran the doctor in post_worker_init: no hazard.
        assert "scoping doctor: " in server_log
    # What reached the database: committed rows only for requests that succeeded.
    with pg_engine.connect() as conn:
        counts: dict[str, int] = dict(
            conn.execute(
                text(
                    "SELECT rid, count(*) FROM scoping_example_rows WHERE rid LIKE :p GROUP BY rid"
                ),
                {"p": f"{run}-%"},
            ).all()
        )
    for i, kind in enumerate(PLAN):
        expected = {"rows": 3, "stream": 5}.get(kind)
        assert counts.get(f"{run}-{i}") == expected, (i, kind)


@pytest.mark.gevent
def test_flask_example_over_http(pg_url: str, tmp_path: pathlib.Path) -> None:
    pytest.importorskip("flask")
    run = uuid.uuid4().hex[:8]
    with _serve("pywsgi", "flask_app", pg_url, str(tmp_path / "flask.log")) as port:

        def one(i: int) -> tuple[str, t.Any]:
            rid = f"{run}-{i}"
            if i % 10 == 9:
                return "fail", _get(port, f"/fail/{rid}")[0]
            status, body = _get(port, f"/notes/{rid}", method="POST", body=b"hi")
            data = json.loads(body)
            ok = status == 200 and data == {"rid": rid, "fresh": True, "notes": [rid]}
            status, streamed = _get(port, f"/notes/{rid}/stream")
            return "ok", ok and status == 200 and streamed == f"{rid}\n".encode()

        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(one, range(60), timeout=60))
        stats = _wait_idle(port)
    assert collections.Counter(results) == {("ok", True): 54, ("fail", 500): 6}
    assert stats == {"registry": 0, "checkedout": 0}
