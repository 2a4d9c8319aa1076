"""stress.postgres: password masking, bad DSNs, the search order, throwaway clusters.

Most tests run against a throwaway cluster started for this module, so they do
not depend on which servers this machine happens to run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import typing as t
from urllib.parse import urlsplit

import psutil
import psycopg2
import pytest
import sqlalchemy

from stress import postgres as pg

if t.TYPE_CHECKING:
    from collections.abc import Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- helpers


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="module")
def cluster() -> Iterator[pg.Server]:
    """A throwaway cluster of this module's own: trust auth, user postgres, 127.0.0.1."""
    try:
        with pg.throwaway_server() as server:
            yield server
    except pg.PostgresUnavailable as exc:
        if _in_ci():
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(" ".join(str(exc).split()))


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections at once (bound, never listening)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def no_env_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pg.ENV_VAR, raising=False)


def _port(server: pg.Server) -> int:
    port = urlsplit(server.dsn).port
    assert port is not None
    return port


def _query(dsn: str, sql: str, *args: object) -> list[tuple[t.Any, ...]]:
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, args or None)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def _postmaster(server: pg.Server) -> tuple[int, str]:
    """(postmaster pid, cluster root directory) of a throwaway server."""
    datadir = _query(server.dsn, "SHOW data_directory")[0][0]
    with open(os.path.join(datadir, "postmaster.pid"), encoding="ascii") as fh:
        return int(fh.readline()), os.path.dirname(datadir)


# --------------------------------------------------------------------------- mask_dsn


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db"),
        ("postgresql://h/db", "postgresql://h/db"),
        ("postgresql+psycopg2://u:s%40cret@h/db", "postgresql+psycopg2://u:***@h/db"),
        ("postgres://u:se@cret@h/db", "postgres://u:***@h/db"),
        ("postgresql://u:a/b@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql://u@h/db?sslmode=require&password=secret",
            "postgresql://u@h/db?sslmode=require&password=***",
        ),
        ("postgresql://u@h/db?options=a@b", "postgresql://u@h/db?options=a@b"),
        ("host=h user=u password=secret dbname=d", "host=h user=u password=*** dbname=d"),
        ("host=h password = 'se cret' port=5", "host=h password = *** port=5"),
        ("host=h PASSWORD=secret", "host=h PASSWORD=***"),
        ("host=h user=u", "host=h user=u"),
    ],
)
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert pg.mask_dsn(dsn) == masked
    assert "secret" not in pg.mask_dsn(dsn)
    assert "cret" not in pg.mask_dsn(dsn)


def test_masked_properties() -> None:
    server = pg.Server(dsn="postgresql://u:secret@h:1/postgres", source="--dsn", version="15")
    db = pg.Database(server=server, name="x", url="postgresql+psycopg2://u:secret@h:1/x")
    assert server.masked == "postgresql://u:***@h:1/postgres"
    assert db.masked_url == "postgresql+psycopg2://u:***@h:1/x"
    assert db.dsn == "postgresql://u:secret@h:1/x"
    assert db.psycopg_url == "postgresql+psycopg://u:secret@h:1/x"


# --------------------------------------------------------------------------- bad DSNs


def _assert_one_clear_line(exc: pg.BadDsn, dsn: str, problem: str) -> None:
    text = str(exc)
    assert isinstance(exc, pg.PostgresUnavailable)
    assert "\n" not in text
    assert pg.mask_dsn(dsn) in text
    assert "secret" not in text
    assert problem in text
    assert "fix:" in text


@pytest.mark.parametrize(
    ("dsn", "problem"),
    [
        ("postgresql://u:secret@127.0.0.1:notaport/db", "malformed DSN"),
        ("host=127.0.0.1 password=secret port", "malformed DSN"),
        ("postgresql://u:secret@127.0.0.1:5432/db?nosuchoption=1", "malformed DSN"),
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


@pytest.mark.postgres
def test_missing_database(cluster: pg.Server) -> None:
    dsn = f"postgresql://postgres:secret@127.0.0.1:{_port(cluster)}/no_such_db"
    with pytest.raises(pg.BadDsn) as info:
        pg.locate_server(dsn)
    _assert_one_clear_line(info.value, dsn, "database 'no_such_db' does not exist")


@pytest.mark.postgres
def test_missing_role(cluster: pg.Server) -> None:
    dsn = f"postgresql://no_such_role:secret@127.0.0.1:{_port(cluster)}/postgres"
    with pytest.raises(pg.BadDsn) as info:
        pg.locate_server(dsn)
    _assert_one_clear_line(info.value, dsn, "role 'no_such_role' does not exist")


@pytest.mark.postgres
def test_wrong_password(cluster: pg.Server) -> None:
    """A role that needs a password (scram via pg_hba.conf) and a wrong one is given."""
    hba = _query(cluster.dsn, "SHOW hba_file")[0][0]
    if not os.access(hba, os.W_OK):
        pytest.skip(f"cannot edit {hba} to require a password")
    _query(cluster.dsn, "CREATE ROLE pw_user LOGIN PASSWORD 'right-password'")
    with open(hba, encoding="utf-8") as fh:
        rules = fh.read()
    with open(hba, "w", encoding="utf-8") as fh:
        fh.write("host all pw_user 127.0.0.1/32 scram-sha-256\n" + rules)
    _query(cluster.dsn, "SELECT pg_reload_conf()")
    base = f"127.0.0.1:{_port(cluster)}/postgres"
    # pg_reload_conf() only signals the postmaster: poll until the rule is in force.
    for _ in range(500):
        try:
            pg.locate_server(f"postgresql://pw_user@{base}")
        except pg.BadDsn:
            break
    else:
        pytest.fail("the scram-sha-256 rule for pw_user never took effect")
    assert pg.locate_server(f"postgresql://pw_user:right-password@{base}").source == "--dsn"

    dsn = f"postgresql://pw_user:secret@{base}"
    with pytest.raises(pg.BadDsn) as info:
        pg.locate_server(dsn)
    _assert_one_clear_line(info.value, dsn, "the server rejected the credentials of user 'pw_user'")


# --------------------------------------------------------------------------- order


@pytest.mark.postgres
def test_explicit_dsn_wins_over_env(
    cluster: pg.Server, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(pg.ENV_VAR, f"postgresql://postgres@127.0.0.1:{closed_port}/postgres")
    with pg.find_server(cluster.dsn) as server:
        assert server.source == "--dsn"
        assert server.dsn == cluster.dsn
        assert server.version == cluster.version


@pytest.mark.postgres
def test_env_dsn_is_used(cluster: pg.Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pg.ENV_VAR, f"host=127.0.0.1 port={_port(cluster)} user=postgres")
    with pg.find_server() as server:
        assert server.source == "SCOPING_DSN"
        # key=value input comes back as a libpq URL to the admin database.
        assert server.dsn == f"postgresql://postgres@127.0.0.1:{_port(cluster)}/postgres"


@pytest.mark.postgres
def test_explicit_dsn_keeps_password_and_options(cluster: pg.Server) -> None:
    port = _port(cluster)
    dsn = f"host=127.0.0.1 port={port} user=postgres password='p w@x' application_name='a b'"
    server = pg.locate_server(dsn)
    assert server.dsn == (
        f"postgresql://postgres:p%20w%40x@127.0.0.1:{port}/postgres?application_name=a%20b"
    )
    assert (
        server.masked
        == f"postgresql://postgres:***@127.0.0.1:{port}/postgres?application_name=a%20b"
    )
    assert _query(server.dsn, "SELECT current_setting('application_name')") == [("a b",)]


@pytest.mark.postgres
def test_unix_socket_dsn(cluster: pg.Server) -> None:
    """A socket directory as host goes into the query string of every URL form."""
    root = os.path.dirname(_query(cluster.dsn, "SHOW data_directory")[0][0])
    server = pg.locate_server(f"host={root} port={_port(cluster)} user=postgres dbname=postgres")
    assert server.dsn == f"postgresql://postgres@/postgres?host={root}&port={_port(cluster)}"
    with pg.temporary_database(server) as db:
        for url in (db.url, db.psycopg_url):
            engine = sqlalchemy.create_engine(url)
            with engine.connect() as conn:
                # inet_server_addr() is NULL over a unix socket
                sql = "SELECT current_database(), inet_server_addr() IS NULL"
                assert tuple(conn.execute(sqlalchemy.text(sql)).one()) == (db.name, True)
            engine.dispose()


@pytest.mark.postgres
def test_bad_env_dsn_does_not_fall_through(
    cluster: pg.Server, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A working compose/local server exists, yet a bad explicit DSN is an error."""
    monkeypatch.setattr(pg, "COMPOSE_DSN", cluster.dsn)
    dsn = f"postgresql://postgres:secret@127.0.0.1:{closed_port}/postgres"
    monkeypatch.setenv(pg.ENV_VAR, dsn)
    with pytest.raises(pg.BadDsn) as info, pg.find_server():
        pass
    assert str(info.value).startswith(f"SCOPING_DSN {pg.mask_dsn(dsn)}: ")


@pytest.mark.postgres
@pytest.mark.usefixtures("no_env_dsn")
def test_compose_before_local(cluster: pg.Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg, "COMPOSE_DSN", cluster.dsn)
    monkeypatch.setattr(pg, "LOCAL_DSN", cluster.dsn)
    with pg.find_server() as server:
        assert server.source == f"compose service 127.0.0.1:{_port(cluster)}"


@pytest.mark.postgres
@pytest.mark.usefixtures("no_env_dsn")
def test_local_when_no_compose(
    cluster: pg.Server, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        pg, "COMPOSE_DSN", f"postgresql://postgres@127.0.0.1:{closed_port}/postgres"
    )
    monkeypatch.setattr(pg, "LOCAL_DSN", cluster.dsn)
    with pg.find_server() as server:
        assert server.source == f"local server 127.0.0.1:{_port(cluster)}"
        assert server.dsn == cluster.dsn


@pytest.mark.usefixtures("no_env_dsn")
def test_nothing_found_names_every_way(closed_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{closed_port}/postgres"
    monkeypatch.setattr(pg, "COMPOSE_DSN", nowhere)
    monkeypatch.setattr(pg, "LOCAL_DSN", nowhere)
    monkeypatch.setattr(pg, "find_bindir", lambda: None)
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


# --------------------------------------------------------------------------- throwaway


@pytest.mark.postgres
def test_throwaway_cluster_lifecycle(closed_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced throwaway: steps 1-3 are skipped (even a bad SCOPING_DSN), the cluster
    serves with the configured settings, and afterwards nothing is left."""
    monkeypatch.setenv(pg.ENV_VAR, f"postgresql://postgres@127.0.0.1:{closed_port}/postgres")
    if pg.find_bindir() is None and not _in_ci():
        pytest.skip("no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin")
    with pg.find_server(throwaway=True) as server:
        pid, root = _postmaster(server)
        assert server.source == f"throwaway cluster ({root})"
        assert _query(server.dsn, "SHOW max_connections") == [("300",)]
        assert pg.THROWAWAY_MAX_CONNECTIONS == 300
        assert _query(server.dsn, "SHOW shared_buffers") == [("32MB",)]
        assert _query(server.dsn, "SHOW unix_socket_directories") == [(root,)]
        assert os.path.exists(os.path.join(root, f".s.PGSQL.{_port(server)}"))
        postmaster = psutil.Process(pid)
        assert postmaster.username() == (
            "postgres" if os.geteuid() == 0 else psutil.Process().username()
        )
        children = [p.pid for p in postmaster.children()]
        assert children  # checkpointer, walwriter, background writer, ...
    assert not psutil.pid_exists(pid)
    assert not any(psutil.pid_exists(child) for child in children)
    assert not os.path.exists(root)


@pytest.mark.postgres
def test_throwaway_retries_when_its_port_is_taken(
    cluster: pg.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The free port is taken by another server before ours binds it: we must not
    hand out that other server, but retry on a new port."""
    ports = iter([_port(cluster)])
    real_free_port = pg._free_port
    monkeypatch.setattr(pg, "_free_port", lambda: next(ports, None) or real_free_port())
    spawned: list[int] = []
    real_spawn = pg._Cluster.spawn

    def spawn(self: pg._Cluster) -> None:
        spawned.append(self.port)
        real_spawn(self)

    monkeypatch.setattr(pg._Cluster, "spawn", spawn)
    with pg.throwaway_server() as server:
        assert spawned == [_port(cluster), _port(server)]
        own_pid, own_root = _postmaster(server)
        other_pid, other_root = _postmaster(cluster)
        assert (own_pid, own_root) != (other_pid, other_root)
        assert server.source == f"throwaway cluster ({own_root})"
    assert not os.path.exists(own_root)
    assert psutil.pid_exists(other_pid)  # the other server is left alone


@pytest.mark.postgres
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_throwaway_cluster_stopped_on_signal(signame: str) -> None:
    """SIGTERM (handler) and Ctrl-C (KeyboardInterrupt) stop and delete the cluster."""
    if pg.find_bindir() is None and not _in_ci():
        pytest.skip("no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin")
    code = (
        "import json, os, sys\n"
        "from stress import postgres as pg\n"
        "with pg.find_server(throwaway=True) as s:\n"
        "    import psycopg2\n"
        "    c = psycopg2.connect(s.dsn); cur = c.cursor(); cur.execute('SHOW data_directory')\n"
        "    d = cur.fetchone()[0]; c.close()\n"
        "    pid = int(open(os.path.join(d, 'postmaster.pid')).readline())\n"
        "    print(json.dumps({'pid': pid, 'root': os.path.dirname(d)}), flush=True)\n"
        "    sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            pytest.fail(f"child did not start a cluster: {proc.communicate(timeout=30)[1]}")
        started = json.loads(line)
        assert psutil.pid_exists(started["pid"])
        proc.send_signal(getattr(signal, signame))
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -getattr(signal, signame), stderr
    assert not psutil.pid_exists(started["pid"])
    assert not os.path.exists(started["root"])


# --------------------------------------------------------------------------- databases


@pytest.mark.postgres
def test_temporary_database_created_and_dropped(cluster: pg.Server) -> None:
    with pg.temporary_database(cluster, prefix="finder") as db:
        assert db.name.startswith(f"finder_{os.getpid()}_")
        assert db.server == cluster
        assert _query(
            cluster.dsn, "SELECT count(*) FROM pg_database WHERE datname = %s", db.name
        ) == [(1,)]
        for url in (db.url, db.psycopg_url):
            engine = sqlalchemy.create_engine(url)
            with engine.connect() as conn:
                assert conn.scalar(sqlalchemy.text("SELECT current_database()")) == db.name
            engine.dispose()
        leftover = psycopg2.connect(db.dsn)  # still open when the block ends
    try:
        assert _query(
            cluster.dsn, "SELECT count(*) FROM pg_database WHERE datname = %s", db.name
        ) == [(0,)]
        with pytest.raises(psycopg2.OperationalError), leftover.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        leftover.close()


@pytest.mark.postgres
def test_postgres_database_on_explicit_dsn(cluster: pg.Server) -> None:
    with pg.postgres_database(cluster.dsn, prefix="explicit") as db:
        assert db.server.source == "--dsn"
        assert db.url == f"postgresql+psycopg2://postgres@127.0.0.1:{_port(cluster)}/{db.name}"
    assert _query(cluster.dsn, "SELECT count(*) FROM pg_database WHERE datname = %s", db.name) == [
        (0,)
    ]


@pytest.mark.postgres
def test_bad_prefix_is_rejected(cluster: pg.Server) -> None:
    with (
        pytest.raises(ValueError, match="prefix"),
        pg.temporary_database(cluster, prefix="Bad-Name"),
    ):
        pass


# --------------------------------------------------------------------------- conftest


def test_pg_fixtures(pg_db: pg.Database, pg_url: str, pg_engine: sqlalchemy.Engine) -> None:
    assert pg_url == pg_db.url
    assert pg_url.startswith("postgresql+psycopg2://")
    assert pg_engine.pool.size() == 5  # type: ignore[attr-defined]
    with pg_engine.connect() as conn:
        assert conn.scalar(sqlalchemy.text("SELECT current_database()")) == pg_db.name


def test_sqlite_url(sqlite_url: str) -> None:
    engine = sqlalchemy.create_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.scalar(sqlalchemy.text("SELECT 1")) == 1
    engine.dispose()
    assert sqlite_url.startswith("sqlite:///") and os.path.exists(sqlite_url[len("sqlite:///") :])


def test_bad_explicit_dsn_fails_the_run_even_outside_ci(closed_port: int) -> None:
    """conftest: an explicit DSN pointing nowhere is an error, never a skip (CI or not)."""
    results = {}
    for ci in ("true", ""):
        env = {**os.environ, "CI": ci}
        env[pg.ENV_VAR] = f"postgresql://nobody:secret@127.0.0.1:{closed_port}/x"
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "tests/test_postgres_finder.py", "-k", "test_pg_fixtures"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        results[ci] = done
    for done in results.values():
        assert done.returncode == 1, done.stdout
        assert "1 error" in done.stdout
        assert "skipped" not in done.stdout
        assert f"nothing accepts connections at 127.0.0.1:{closed_port}" in done.stdout
        assert "secret" not in done.stdout
