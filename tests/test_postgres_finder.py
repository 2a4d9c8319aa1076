"""stress.postgres: the search order, bad DSNs, throwaway clusters, teardown and reaping.

Tests of the order and of databases use the session's server (``pg_server``).
Tests of the throwaway cluster itself start their own (1 to 6 s each on a busy
machine) and are marked slow. Masking has its own module, test_dsn.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import typing as t

import psutil
import psycopg2
import pytest
import sqlalchemy

from stress import postgres as pg
from stress.postgres import cluster as pg_cluster
from stress.postgres import databases as pg_databases
from stress.postgres import dsn as pg_dsn
from stress.postgres import locate as pg_locate
from stress.postgres.leftovers import Owner

if t.TYPE_CHECKING:
    from collections.abc import Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- helpers


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _need_binaries() -> None:
    if pg.find_bindir() is None and not _in_ci():
        pytest.skip("no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin")


@pytest.fixture(scope="module")
def cluster() -> Iterator[pg.Server]:
    """A throwaway cluster of this module's own (socket trust, TCP scram-sha-256)."""
    _need_binaries()
    try:
        with pg.throwaway_server() as server:
            yield server
    except pg.PostgresUnavailable as exc:
        if _in_ci():
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(" ".join(str(exc).split()))


def _live(server: pg.Server) -> pg_cluster._Cluster:
    """The in-process record of a throwaway server (holds its TCP password)."""
    return next(c for c in pg_cluster._LIVE.values() if server.source.endswith(f"({c.root})"))


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections at once (bound, never listening)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def no_env_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pg.ENV_VAR, raising=False)


def _params(server: pg.Server) -> dict[str, str]:
    parsed = pg_dsn.parse(server.dsn).params
    assert parsed is not None
    return parsed


def _query(dsn: str, sql: str, *args: object) -> list[tuple[t.Any, ...]]:
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, args or None)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def _exists(server: pg.Server, name: str) -> bool:
    rows = _query(server.dsn, "SELECT count(*) FROM pg_database WHERE datname = %s", name)
    return rows == [(1,)]


def _postmaster(server: pg.Server) -> tuple[int, str]:
    """(postmaster pid, cluster root directory) of a throwaway server."""
    datadir = _query(server.dsn, "SHOW data_directory")[0][0]
    with open(os.path.join(datadir, "postmaster.pid"), encoding="ascii") as fh:
        return int(fh.readline()), os.path.dirname(datadir)


def _as_dsn(server: pg.Server, **changes: str) -> str:
    params = {**_params(server), **changes}
    return pg_dsn.build_url("postgresql", params)


# --------------------------------------------------------------------------- bad DSNs


def _assert_one_clear_line(exc: pg.BadDsn, dsn: str, problem: str) -> None:
    text = str(exc)
    assert isinstance(exc, pg.PostgresUnavailable)
    assert "\n" not in text
    assert pg.mask_dsn(dsn) in text
    assert "secret" not in text
    assert problem in text
    assert "fix:" in text
    assert exc.__context__ is None
    assert exc.__cause__ is None


@pytest.mark.parametrize(
    ("dsn", "problem"),
    [
        ("postgresql://u:secret@127.0.0.1:notaport/db", "malformed DSN"),
        ("host=127.0.0.1 password=secret port", "malformed DSN"),
        ("postgresql://u:secret@127.0.0.1:5432/db?nosuchoption=1", "malformed DSN"),
        ("mysql://u:secret@127.0.0.1/db", "not a PostgreSQL URL (scheme mysql)"),
        ("postgresql://u:a/secret@127.0.0.1/db", "ambiguous DSN"),
    ],
)
def test_malformed_dsn(dsn: str, problem: str) -> None:
    with pytest.raises(pg.BadDsn) as info:
        pg.locate_server(dsn)
    _assert_one_clear_line(info.value, dsn, problem)


def test_unreachable_port(closed_port: int) -> None:
    dsn = f"postgresql://u:secret@127.0.0.1:{closed_port}/postgres"
    with pytest.raises(pg.BadDsn) as info:
        pg.locate_server(dsn)
    _assert_one_clear_line(
        info.value, dsn, f"nothing accepts connections at 127.0.0.1:{closed_port}"
    )
    assert str(info.value).startswith("--dsn ")


def test_missing_database(pg_server: pg.Server) -> None:
    dsn = _as_dsn(pg_server, dbname="no_such_db", password="secret")
    with pytest.raises(pg.BadDsn) as info:
        pg.locate_server(dsn)
    _assert_one_clear_line(info.value, dsn, "database 'no_such_db' does not exist")


def test_missing_role(pg_server: pg.Server) -> None:
    dsn = _as_dsn(pg_server, user="no_such_role", password="secret")
    with pytest.raises(pg.BadDsn) as info:
        pg.locate_server(dsn)
    text = str(info.value)
    # A trusting server says the role does not exist; one asking for a password rejects it.
    assert "role 'no_such_role' does not exist" in text or "rejected the credentials" in text
    _assert_one_clear_line(info.value, dsn, "no_such_role")


# --------------------------------------------------------------------------- order


def test_explicit_dsn_wins_over_env(
    pg_server: pg.Server, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(pg.ENV_VAR, f"postgresql://postgres@127.0.0.1:{closed_port}/postgres")
    with pg.find_server(pg_server.dsn) as server:
        assert server.source == "--dsn"
        assert server.dsn == pg_server.dsn
        assert server.version == pg_server.version


def test_env_dsn_is_used(pg_server: pg.Server, monkeypatch: pytest.MonkeyPatch) -> None:
    params = _params(pg_server)
    kv = " ".join(f"{k}={v}" for k, v in params.items() if k != "dbname")
    monkeypatch.setenv(pg.ENV_VAR, kv)
    with pg.find_server() as server:
        assert server.source == "SCOPING_DSN"
        # key=value input comes back as a libpq URL to the admin database.
        assert server.dsn == pg_dsn.build_url("postgresql", {**params, "dbname": "postgres"})


def test_explicit_dsn_keeps_options(pg_server: pg.Server) -> None:
    params = _params(pg_server)
    kv = " ".join(f"{k}={v}" for k, v in params.items()) + " application_name='a b'"
    server = pg.locate_server(kv)
    assert server.dsn.endswith("application_name=a%20b")
    assert _query(server.dsn, "SELECT current_setting('application_name')") == [("a b",)]


def test_bad_env_dsn_does_not_fall_through(
    pg_server: pg.Server, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A working compose/local server exists, yet a bad explicit DSN is an error."""
    monkeypatch.setattr(pg_locate, "COMPOSE_DSN", pg_server.dsn)
    dsn = f"postgresql://postgres:secret@127.0.0.1:{closed_port}/postgres"
    monkeypatch.setenv(pg.ENV_VAR, dsn)
    with pytest.raises(pg.BadDsn) as info, pg.find_server():
        pass
    assert str(info.value).startswith(f"SCOPING_DSN {pg.mask_dsn(dsn)}: ")


@pytest.mark.usefixtures("no_env_dsn")
def test_compose_before_local(pg_server: pg.Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg_locate, "COMPOSE_DSN", pg_server.dsn)
    monkeypatch.setattr(pg_locate, "LOCAL_DSN", pg_server.dsn)
    with pg.find_server() as server:
        assert server.source.startswith("compose service ")


@pytest.mark.usefixtures("no_env_dsn")
def test_local_when_no_compose(
    pg_server: pg.Server, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        pg_locate, "COMPOSE_DSN", f"postgresql://postgres@127.0.0.1:{closed_port}/postgres"
    )
    monkeypatch.setattr(pg_locate, "LOCAL_DSN", pg_server.dsn)
    with pg.find_server() as server:
        assert server.source.startswith("local server ")
        assert server.dsn == pg_server.dsn


@pytest.mark.usefixtures("no_env_dsn")
def test_nothing_found_names_every_way(closed_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{closed_port}/postgres"
    monkeypatch.setattr(pg_locate, "COMPOSE_DSN", nowhere)
    monkeypatch.setattr(pg_locate, "LOCAL_DSN", nowhere)
    monkeypatch.setattr(pg_cluster, "find_bindir", lambda: None)
    with pytest.raises(pg.PostgresUnavailable) as info, pg.find_server():
        pass
    text = str(info.value)
    assert not isinstance(info.value, pg.BadDsn)
    assert "docker compose up -d postgres" in text
    assert "--dsn" in text
    assert "SCOPING_DSN" in text
    assert "/usr/lib/postgresql/*/bin" in text
    assert f"compose service 127.0.0.1:{closed_port} as postgres: nothing accepts" in text
    assert len(info.value.tried) == 4  # env, compose, local, throwaway


# --------------------------------------------------------------------------- databases


def test_temporary_database_created_and_dropped(pg_server: pg.Server) -> None:
    with pg.temporary_database(pg_server, prefix="finder") as db:
        owner = Owner.current()
        assert db.name.startswith(f"finder_{owner.pid}_{owner.start}_{owner.host}_")
        assert db.server == pg_server
        assert _exists(pg_server, db.name)
        for url in (db.url, db.psycopg_url):
            engine = sqlalchemy.create_engine(url)
            with engine.connect() as conn:
                assert conn.scalar(sqlalchemy.text("SELECT current_database()")) == db.name
            engine.dispose()
        leftover = psycopg2.connect(db.dsn)  # still open when the block ends
    try:
        assert not _exists(pg_server, db.name)
        with pytest.raises(psycopg2.OperationalError), leftover.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        leftover.close()


def test_postgres_database_on_explicit_dsn(pg_server: pg.Server) -> None:
    with pg.postgres_database(pg_server.dsn, prefix="explicit") as db:
        assert db.server.source == "--dsn"
        expected = pg_dsn.build_url(
            "postgresql+psycopg2", {**_params(pg_server), "dbname": db.name}
        )
        assert db.url == expected
        assert db.url_for("asyncpg") == "postgresql+asyncpg://" + db.url.partition("://")[2]
    assert not _exists(pg_server, db.name)


@pytest.mark.parametrize("prefix", ["Bad-Name", "x" * 21, "a__b", "_a", ""])
def test_bad_prefix_is_rejected(pg_server: pg.Server, prefix: str) -> None:
    with (
        pytest.raises(ValueError, match="prefix"),
        pg.temporary_database(pg_server, prefix=prefix),
    ):
        pass


def test_drop_failure_is_logged_not_raised(
    pg_server: pg.Server, closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The server vanished before the drop: a masked warning, no traceback."""
    gone = pg.Server(
        dsn=f"postgresql://postgres:secret@127.0.0.1:{closed_port}/postgres",
        source="test",
        version="15",
    )
    with caplog.at_level(logging.WARNING, logger="stress.postgres"):
        pg_databases._drop_quietly(gone, "nothing_here")
    assert "could not drop database nothing_here" in caplog.text
    assert "secret" not in caplog.text


# --------------------------------------------------------------------------- connection budget


def test_max_connections(pg_server: pg.Server) -> None:
    expected = int(_query(pg_server.dsn, "SHOW max_connections")[0][0])
    assert pg.max_connections(pg_server) == expected
    assert pg.max_connections(pg_server.dsn) == expected
    budget = pg.connection_budget(pg_server)
    assert budget.max_connections == expected
    assert budget.reserved >= int(
        _query(pg_server.dsn, "SHOW superuser_reserved_connections")[0][0]
    )
    assert 0 <= budget.free <= expected - budget.reserved


def test_check_connections(pg_server: pg.Server) -> None:
    assert pg.check_connections(pg_server, 1).free >= 1
    with pytest.raises(pg.TooManyConnections) as info:
        pg.check_connections(pg_server, 100_000, what="--concurrency 100000")
    text = str(info.value)
    assert text.startswith("--concurrency 100000 needs 100000 connections but the server at ")
    assert pg_server.masked in text
    assert "fix: ask for at most" in text
    assert "max_connections" in text
    assert info.value.needed == 100_000
    assert 0 <= info.value.available < 100_000
    with pytest.raises(ValueError, match="at least 1"):
        pg.check_connections(pg_server, 0)


# --------------------------------------------------------------------------- conftest


def test_pg_fixtures(pg_db: pg.Database, pg_url: str, pg_engine: sqlalchemy.Engine) -> None:
    assert pg_url == pg_db.url
    assert pg_url.startswith("postgresql+psycopg2://")
    assert pg_engine.pool.size() == 5  # type: ignore[attr-defined]
    with pg_engine.connect() as conn:
        assert conn.scalar(sqlalchemy.text("SELECT current_database()")) == pg_db.name


def test_pg_env_reaches_the_database_from_a_child(
    pg_db: pg.Database, pg_env: dict[str, str]
) -> None:
    assert set(pg_env) <= {"SCOPING_TEST_DSN", "PGPASSFILE"}
    assert pg_dsn.parse(pg_env["SCOPING_TEST_DSN"]).secrets == ()
    code = (
        "import os, sqlalchemy\n"
        "e = sqlalchemy.create_engine(os.environ['SCOPING_TEST_DSN'])\n"
        "with e.connect() as c: print(c.scalar(sqlalchemy.text('SELECT current_database()')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **pg_env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == pg_db.name


def test_sqlite_url(sqlite_url: str) -> None:
    engine = sqlalchemy.create_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.scalar(sqlalchemy.text("SELECT 1")) == 1
    engine.dispose()
    assert sqlite_url.startswith("sqlite:///")
    assert os.path.exists(sqlite_url[len("sqlite:///") :])


@pytest.mark.slow
def test_bad_explicit_dsn_fails_the_run_even_outside_ci(closed_port: int) -> None:
    """conftest: an explicit DSN pointing nowhere is an error, never a skip (CI or not)."""
    results = {}
    for ci in ("true", ""):
        env = {**os.environ, "CI": ci}
        env[pg.ENV_VAR] = f"postgresql://nobody:secret@127.0.0.1:{closed_port}/x"
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
             "tests/test_postgres_finder.py", "-k", "test_pg_fixtures"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        results[ci] = done
    for done in results.values():
        assert done.returncode == 1, done.stdout
        assert "1 error" in done.stdout
        assert "skipped" not in done.stdout
        assert f"nothing accepts connections at 127.0.0.1:{closed_port}" in done.stdout
        assert f"PostgreSQL: SCOPING_DSN postgresql://nobody:***@127.0.0.1:{closed_port}/x" in (
            done.stdout
        )
        assert "secret" not in done.stdout + done.stderr


# --------------------------------------------------------------------------- throwaway


@pytest.mark.slow
@pytest.mark.postgres
def test_throwaway_cluster_lifecycle(closed_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced throwaway: steps 1-3 are skipped (even a bad SCOPING_DSN), the cluster
    serves with the configured settings over its socket, and afterwards nothing is left."""
    _need_binaries()
    monkeypatch.setenv(pg.ENV_VAR, f"postgresql://postgres@127.0.0.1:{closed_port}/postgres")
    with pg.find_server(throwaway=True) as server:
        pid, root = _postmaster(server)
        assert server.source == f"throwaway cluster ({root})"
        params = _params(server)
        assert params["host"] == root  # a socket URL, with no password
        assert pg_dsn.parse(server.dsn).secrets == ()
        assert os.path.basename(root).startswith(f"scoping-pg-{Owner.current().tag}-")
        assert _query(server.dsn, "SHOW max_connections") == [("300",)]
        assert pg.THROWAWAY_MAX_CONNECTIONS == 300
        assert _query(server.dsn, "SHOW shared_buffers") == [("32MB",)]
        assert _query(server.dsn, "SHOW unix_socket_directories") == [(root,)]
        assert _query(server.dsn, "SHOW unix_socket_permissions") == [("0700",)]
        assert _query(server.dsn, "SHOW listen_addresses") == [("127.0.0.1",)]
        assert os.stat(root).st_mode & 0o777 == 0o700
        assert sorted(os.listdir(root)) == sorted(
            [
                "data",
                "postgres.log",
                f".s.PGSQL.{params['port']}",
                f".s.PGSQL.{params['port']}.lock",
            ]
        )  # the password file is gone once initdb has read it
        hba = _query(server.dsn, "SELECT type, auth_method FROM pg_hba_file_rules")
        assert {method for kind, method in hba if kind == "host"} == {"scram-sha-256"}
        assert {method for kind, method in hba if kind == "local"} == {"trust"}
        postmaster = psutil.Process(pid)
        assert postmaster.username() == (
            "postgres" if os.geteuid() == 0 else psutil.Process().username()
        )
        children = [p.pid for p in postmaster.children()]
        assert children  # checkpointer, walwriter, background writer, ...
        with pg.temporary_database(server) as db:
            for driver in ("psycopg2", "psycopg"):
                engine = sqlalchemy.create_engine(db.url_for(driver))
                with engine.connect() as conn:
                    sql = "SELECT current_database(), inet_server_addr() IS NULL"
                    assert tuple(conn.execute(sqlalchemy.text(sql)).one()) == (db.name, True)
                engine.dispose()
    assert not psutil.pid_exists(pid)
    assert not any(psutil.pid_exists(child) for child in children)
    assert not os.path.exists(root)


@pytest.mark.slow
@pytest.mark.postgres
def test_wrong_password_over_tcp(cluster: pg.Server) -> None:
    """TCP needs scram-sha-256 for every role: the run's password works, others do not."""
    port = _params(cluster)["port"]
    right = _live(cluster).password
    tcp = f"postgresql://postgres:{right}@127.0.0.1:{port}/postgres"
    assert pg.locate_server(tcp).source == "--dsn"
    for password in ("secret", ""):
        dsn = f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres"
        with pytest.raises(pg.BadDsn) as info:
            pg.locate_server(dsn)
        assert "the server rejected the credentials of user 'postgres'" in str(info.value)
        assert right not in str(info.value)
        if password:
            _assert_one_clear_line(info.value, dsn, "rejected the credentials")


@pytest.mark.slow
@pytest.mark.postgres
def test_another_os_user_cannot_log_in(cluster: pg.Server) -> None:
    """As ``nobody``: the socket is out of reach, TCP wants a password nobody knows."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run psql as another OS user (runuser -u nobody)")
    params = _params(cluster)
    psql = os.path.join(pg.find_bindir() or "", "psql")
    if not os.access(psql, os.X_OK):
        psql = "psql"
    attempts = {
        "socket": ["-h", params["host"], "-p", params["port"]],
        "tcp": ["-h", "127.0.0.1", "-p", params["port"]],
    }
    outcome = {}
    for name, where in attempts.items():
        done = subprocess.run(
            ["runuser", "-u", "nobody", "--", psql, *where, "-U", "postgres", "-w",
             "-d", "postgres", "-c", "COPY (SELECT 1) TO PROGRAM 'id'"],
            capture_output=True, text=True, timeout=60, check=False,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
        )  # fmt: skip
        outcome[name] = (done.returncode, done.stderr)
    assert outcome["socket"][0] == 2, outcome
    assert "Permission denied" in outcome["socket"][1], outcome
    assert outcome["tcp"][0] == 2, outcome
    assert "no password supplied" in outcome["tcp"][1], outcome
    # A guessed password is refused too (the same psql, PGPASSWORD set).
    done = subprocess.run(
        ["runuser", "-u", "nobody", "--", psql, *attempts["tcp"], "-U", "postgres", "-w",
         "-d", "postgres", "-c", "SELECT 1"],
        capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGPASSWORD": "postgres"},
    )  # fmt: skip
    assert done.returncode == 2
    assert "password authentication failed" in done.stderr


@pytest.mark.slow
@pytest.mark.postgres
def test_password_is_in_no_argv_or_environment(cluster: pg.Server) -> None:
    """While the cluster serves a database and a child using pg_env-style settings runs,
    neither ``ps -eo args`` nor any readable /proc/*/environ shows the run's password."""
    password = _live(cluster).password
    port = _params(cluster)["port"]
    tcp_url = f"postgresql+psycopg2://postgres:{password}@127.0.0.1:{port}/postgres"
    code = "import sys, sqlalchemy; e = sqlalchemy.create_engine(sys.stdin.readline().strip())\n"
    code += "c = e.connect(); print('ready', flush=True); sys.stdin.readline()\n"
    with pg.temporary_database(cluster), pg.passfile_env(tcp_url) as (public, env):
        assert password not in public
        assert password not in json.dumps(env)
        with subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **env},
            text=True,
        ) as child:
            assert child.stdin is not None
            assert child.stdout is not None
            child.stdin.write(public + "\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "ready"
            ps = subprocess.run(
                ["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True
            ).stdout
            environs = []
            for pid in psutil.pids():
                try:
                    with open(f"/proc/{pid}/environ", "rb") as fh:
                        environs.append(fh.read())
                except OSError:
                    continue
            child.stdin.write("\n")
            child.stdin.flush()
    assert child.returncode == 0
    assert f"-p {port}" in ps  # the postmaster is in the listing...
    assert password not in ps  # ...but not the password
    assert not any(password.encode() in environ for environ in environs)


@pytest.mark.slow
@pytest.mark.postgres
def test_throwaway_retries_when_its_port_is_taken(
    monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    """The free port is taken (here: bound by the test) before the server binds it:
    it must retry on a new port."""
    _need_binaries()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy])
        real_free_port = pg_cluster._free_port
        monkeypatch.setattr(pg_cluster, "_free_port", lambda: next(ports, None) or real_free_port())
        spawned: list[int] = []
        real_spawn = pg_cluster._Cluster.spawn

        def spawn(self: pg_cluster._Cluster) -> None:
            spawned.append(self.port)
            real_spawn(self)

        monkeypatch.setattr(pg_cluster._Cluster, "spawn", spawn)
        with pg.throwaway_server() as server:
            assert spawned == [busy, int(_params(server)["port"])]
            _, root = _postmaster(server)
        assert not os.path.exists(root)


def _child(code: str, **kwargs: t.Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


_CHILD_WITH_DATABASE = """
import json, logging, os, signal, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from stress import postgres as pg


def main():
    with pg.find_server(throwaway=True) as s, pg.temporary_database(s, prefix="sig") as db:
        import psycopg2
        c = psycopg2.connect(s.dsn); cur = c.cursor(); cur.execute('SHOW data_directory')
        d = cur.fetchone()[0]; c.close()
        pid = int(open(os.path.join(d, 'postmaster.pid')).readline())
        print(json.dumps({'pid': pid, 'root': os.path.dirname(d), 'db': db.name}), flush=True)
        sys.stdin.read()


"""


def _start_child(runner: str = "main()") -> tuple[subprocess.Popen[str], dict[str, t.Any]]:
    proc = _child(_CHILD_WITH_DATABASE + runner + "\n")
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        pytest.fail(f"child did not start a cluster: {proc.communicate(timeout=30)[1]}")
    started: dict[str, t.Any] = json.loads(line)
    assert psutil.pid_exists(started["pid"])
    return proc, started


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_signal_drops_the_database_then_stops_the_cluster(signame: str) -> None:
    """SIGTERM/SIGHUP with default handling: the stack unwinds in order (database
    dropped, then cluster stopped and deleted), exit 128 + signal, no traceback."""
    _need_binaries()
    proc, started = _start_child()
    proc.send_signal(getattr(signal, signame))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(signal, signame), stderr
    assert "Traceback" not in stderr
    assert f"dropped database {started['db']}" in stderr
    assert "could not drop" not in stderr
    assert not psutil.pid_exists(started["pid"])
    assert not os.path.exists(started["root"])


@pytest.mark.slow
@pytest.mark.postgres
def test_signal_calls_the_applications_handler_first() -> None:
    """An application handler raising KeyboardInterrupt (as the stress CLI's does) is
    called; the unwinding it starts still drops the database before the cluster goes."""
    _need_binaries()
    runner = (
        "def stop(signum, frame):\n"
        "    raise KeyboardInterrupt\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "try:\n"
        "    main()\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(143)\n"
    )
    proc, started = _start_child(runner)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert f"dropped database {started['db']}" in stderr
    assert not os.path.exists(started["root"])


@pytest.mark.slow
@pytest.mark.postgres
def test_ctrl_c_stops_the_cluster() -> None:
    _need_binaries()
    proc, started = _start_child()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, stderr
    assert f"dropped database {started['db']}" in stderr
    assert not psutil.pid_exists(started["pid"])
    assert not os.path.exists(started["root"])


# --------------------------------------------------------------------------- kill -9 leftovers


@pytest.mark.slow
@pytest.mark.postgres
def test_reap_leftovers_of_a_killed_run(pg_server: pg.Server) -> None:
    """A run killed with SIGKILL leaves its cluster (postmaster still running), its
    database on the shared server and its temp file. reap_leftovers() removes those,
    and only those: a live run's database and foreign names stay."""
    _need_binaries()
    code = f"""
        import json, os, sys
        from stress import postgres as pg
        fd, path = pg.owned_mkstemp("h4-test-", ".err"); os.close(fd)
        with pg.throwaway_server() as s:
            shared = pg.Server(dsn={pg_server.dsn!r}, source="shared", version="")
            with pg.temporary_database(shared, prefix="reapme") as db:
                print(json.dumps({{"db": db.name, "file": path,
                                   "root": s.source.split("(")[1].rstrip(")")}}), flush=True)
                sys.stdin.read()
    """
    victim = _child(code)
    assert victim.stdout is not None
    line = victim.stdout.readline()
    assert line, victim.communicate(timeout=30)[1]
    left = json.loads(line)
    with pg.temporary_database(pg_server, prefix="alive") as alive:  # a live run's database
        foreign = f"reapme_1_1_deadbeef_{'a' * 6}"  # another host's run
        plain = "reapme_no_tag_here"
        for name in (foreign, plain):
            _query(pg_server.dsn, f'CREATE DATABASE "{name}" TEMPLATE template0')
        try:
            victim.kill()
            victim.communicate(timeout=30)
            assert _exists(pg_server, left["db"])
            assert os.path.exists(left["file"])
            assert os.path.exists(left["root"])
            with open(os.path.join(left["root"], "data", "postmaster.pid"), encoding="ascii") as fh:
                orphan = psutil.Process(int(fh.readline()))
            assert orphan.is_running()  # the postmaster outlives its killed parent
            reaped = pg.reap_leftovers(pg_server, temp_files=[("h4-test-", ".err")])
            assert left["db"] in reaped.databases
            assert left["root"] in reaped.clusters
            assert reaped.files == (left["file"],)
            assert not _exists(pg_server, left["db"])
            assert not os.path.exists(left["root"])
            assert not os.path.exists(left["file"])
            assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
            for name in (alive.name, foreign, plain):
                assert _exists(pg_server, name)
            assert not pg.reap_leftovers(pg_server, temp_files=[("h4-test-", ".err")])
        finally:
            for name in (foreign, plain):
                _query(pg_server.dsn, f'DROP DATABASE IF EXISTS "{name}"')


def test_owner_is_gone_only_when_it_is() -> None:
    me = Owner.current()
    assert not me.is_gone()
    assert me.tag == f"{me.pid}-{me.start}-{me.host}"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert Owner(child.pid, me.start, me.host).is_gone() or psutil.pid_exists(child.pid)
    reused = Owner(os.getppid(), 1, me.host)  # a live pid with another start time
    assert reused.is_gone()
    assert not Owner(child.pid, 1, "deadbeef").is_gone()  # another host: never ours
    assert Owner.from_parts("12", "34", "nothex!!") is None


def test_reap_temp_files_keeps_live_and_foreign(tmp_path: t.Any) -> None:
    me = Owner.current()
    live = tmp_path / f"x-{me.tag}-abc.err"
    foreign = tmp_path / "x-1-1-deadbeef-abc.err"
    untagged = tmp_path / "x-whatever.err"
    dead = tmp_path / f"x-{os.getppid()}-1-{me.host}-abc.err"  # pid alive, other start
    for path in (live, foreign, untagged, dead):
        path.write_text("")
    assert pg.reap_temp_files("x-", ".err", str(tmp_path)) == [str(dead)]
    assert live.exists()
    assert foreign.exists()
    assert untagged.exists()
    with pytest.raises(ValueError, match="prefix"):
        pg.reap_temp_files("", ".err")


@pytest.mark.slow
@pytest.mark.postgres
def test_forked_child_leaves_the_parents_cluster_alone() -> None:
    """A forked child that exits normally (atexit) or dies of SIGTERM does not stop
    the cluster of the parent, which still serves afterwards."""
    _need_binaries()
    code = """
        import json, os, signal, sys, time
        import psycopg2
        from stress import postgres as pg
        with pg.throwaway_server() as s:
            outcome = {}
            for how in ("exit", "sigterm"):
                pid = os.fork()
                if pid == 0:
                    if how == "sigterm":
                        os.kill(os.getpid(), signal.SIGTERM)
                        time.sleep(30)
                    sys.exit(0)  # runs atexit in the child
                _, status = os.waitpid(pid, 0)
                c = psycopg2.connect(s.dsn); c.close()  # the cluster still serves
                outcome[how] = status
            print(json.dumps(outcome), flush=True)
    """
    proc = _child(code)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    outcome = json.loads(out.strip().splitlines()[-1])
    assert os.WIFEXITED(outcome["exit"])
    assert os.WEXITSTATUS(outcome["exit"]) == 0
    assert os.WIFSIGNALED(outcome["sigterm"])
    assert os.WTERMSIG(outcome["sigterm"]) == signal.SIGTERM
