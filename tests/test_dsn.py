"""stress.postgres.dsn: no secret survives masking, messages, reprs or tracebacks.

Every hostile password below holds the markers ``xyzzy`` and ``wombat`` on both
sides of its special character, so a leak of any fragment of it is caught.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import traceback
import typing as t

import pytest

from stress import postgres as pg
from stress.postgres import dsn as pg_dsn

if t.TYPE_CHECKING:
    from collections.abc import Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKERS = ("xyzzy", "wombat")

#: (DSN template, its masked form); ``{at}`` is ``127.0.0.1:<closed port>``.
HOSTILE = [
    ("postgresql://u:xyzzy?wombat@{at}/db", "postgresql://u:***@{at}/db"),
    ("postgresql://u:xyzzy@wombat@{at}/db", "postgresql://***"),
    ("postgresql://u:xyzzy#wombat@{at}/db", "postgresql://u:***@{at}/db"),
    ("postgresql://u:xyzzy/wombat@{at}/db", "postgresql://***"),
    ("postgresql://u:xyzzy:wombat@{at}/db", "postgresql://u:***@{at}/db"),
    ("postgresql://u:xyzzy%40wombat@{at}/db", "postgresql://u:***@{at}/db"),
    ("postgresql+psycopg2://u:xyzzy%40wombat@{at}/db", "postgresql+psycopg2://u:***@{at}/db"),
    ("postgresql://u:xyzzy€wombat@{at}/db", "postgresql://u:***@{at}/db"),
    ("postgresql://u:xyzzy%E2%82%ACwombat@{at}/db", "postgresql://u:***@{at}/db"),
    ("postgresql://u:@{at}/db", "postgresql://u@{at}/db"),
    ("postgresql://u@{at}/db?password=xyzzy%26wombat&sslmode=disable",
     "postgresql://u:***@{at}/db?sslmode=disable"),
    ("postgresql://u@{at}/db?sslpassword=xyzzywombat", "postgresql://u@{at}/db?sslpassword=***"),
    ("postgresql://u:xyzzywombat@{at}:notaport/db", "postgresql://***"),
    ("postgresql://u:xyzzywombat@[::1/db", "postgresql://***"),
    ("mysql://u:xyzzy?wombat@{at}/db", "mysql://u:***@{at}/db"),
    ("host={host} port={port} user=u password=xyzzywombat dbname=d",
     "user=u password=*** dbname=d host={host} port={port}"),
    ("host={host} port={port} password='xyzzy wombat'", "password=*** host={host} port={port}"),
    ("host={host} port={port} sslpassword=xyzzy\\'wombat",
     "host={host} port={port} sslpassword=***"),
    ("host={host} password xyzzywombat", "***"),
]  # fmt: skip


@pytest.fixture(scope="module")
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections at once (bound, never listening)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _fill(template: str, port: int) -> str:
    return template.format(at=f"127.0.0.1:{port}", host="127.0.0.1", port=port)


def _assert_clean(text: str) -> None:
    low = text.lower()
    for marker in MARKERS:
        assert marker not in low, text


def _everything_about(exc: BaseException) -> str:
    """What a user can see of an exception: str, repr and the full chained traceback."""
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


@pytest.mark.parametrize(("template", "masked"), HOSTILE)
def test_mask_dsn(template: str, masked: str, closed_port: int) -> None:
    dsn = _fill(template, closed_port)
    assert pg.mask_dsn(dsn) == _fill(masked, closed_port)
    _assert_clean(pg.mask_dsn(dsn))


@pytest.mark.parametrize(("template", "masked"), HOSTILE)
def test_scrub(template: str, masked: str, closed_port: int) -> None:
    dsn = _fill(template, closed_port)
    for secret in pg_dsn.secrets_in(dsn):
        _assert_clean(pg.scrub(f"error near {secret!r} in {dsn}", dsn))
    _assert_clean(pg.scrub(f"connect({dsn}) failed", dsn))


@pytest.mark.parametrize(("template", "masked"), HOSTILE)
def test_parse_repr_hides_secrets(template: str, masked: str, closed_port: int) -> None:
    _assert_clean(repr(pg_dsn.parse(_fill(template, closed_port))))


@pytest.mark.parametrize(("template", "masked"), HOSTILE)
def test_finder_errors_and_tracebacks(template: str, masked: str, closed_port: int) -> None:
    """locate_server() refuses each one in a single masked line, chained to nothing."""
    dsn = _fill(template, closed_port)
    with pytest.raises(pg.BadDsn) as info:
        pg.locate_server(dsn)
    text = str(info.value)
    assert text.startswith(f"--dsn {pg.mask_dsn(dsn)}: ")
    assert "fix: " in text
    assert "\n" not in text
    assert info.value.__context__ is None
    assert info.value.__cause__ is None
    _assert_clean(_everything_about(info.value))


@pytest.mark.parametrize(
    ("dsn", "problem", "fix"),
    [
        ("mysql://u:xyzzy@h/db", "not a PostgreSQL URL (scheme mysql)", "pass a postgresql:// URL"),
        ("sqlite:////tmp/stress.db", "not a PostgreSQL URL (scheme sqlite)", "postgresql://"),
        ("postgresql://u:xyzzy/wombat@h/db", "ambiguous DSN", "percent-encode"),
        ("postgresql://u:xyzzywombat@h:x/db", "malformed DSN", "percent-encode"),
    ],
)
def test_problem_and_fix_are_named(dsn: str, problem: str, fix: str) -> None:
    with pytest.raises(pg.BadDsn) as info:
        pg.locate_server(dsn)
    assert problem in str(info.value)
    assert f"fix: {fix}" in str(info.value) or fix in str(info.value).split("fix: ", 1)[1]
    _assert_clean(_everything_about(info.value))


def test_pgpassword_never_shows(closed_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "xyzzy@wombat")
    assert pg.scrub("libpq said xyzzy@wombat and xyzzy%40wombat") == "libpq said *** and ***"
    with pytest.raises(pg.BadDsn) as info:
        pg.locate_server(f"postgresql://u@127.0.0.1:{closed_port}/db")
    _assert_clean(_everything_about(info.value))


def test_other_entry_points_raise_unchained_masked_errors(closed_port: int) -> None:
    """Errors from the layer's other functions: masked, and no driver error attached."""
    dsn = f"postgresql://u:xyzzy%3Fwombat@127.0.0.1:{closed_port}/db"
    server = pg.Server(dsn=dsn, source="test", version="15")
    garbled = "host=h password " + "".join(MARKERS)  # no literal: tracebacks quote the source
    calls: list[t.Callable[[], object]] = [
        lambda: pg.max_connections(dsn),
        lambda: pg.check_connections(server, 5),
        lambda: pg.reap_databases(dsn),
        lambda: pg.temporary_database(server).__enter__(),
        lambda: pg.reap_databases(garbled),
    ]
    for call in calls:
        with pytest.raises((pg.PostgresUnavailable, ValueError)) as info:
            call()
        assert info.value.__context__ is None, repr(info.value.__context__)
        _assert_clean(_everything_about(info.value))


def test_reprs_are_masked() -> None:
    server = pg.Server(
        dsn="postgresql://u:xyzzy%3Fwombat@h:1/postgres", source="--dsn", version="15"
    )
    db = pg.Database(server=server, name="x", url="postgresql+psycopg2://u:xyzzy%3Fwombat@h:1/x")
    for text in (repr(server), repr(db), str(server), str([db]), f"{db!r}"):
        _assert_clean(text)
    assert server.masked == "postgresql://u:***@h:1/postgres"
    assert db.masked_url == "postgresql+psycopg2://u:***@h:1/x"
    # The real values stay usable.
    assert db.dsn == "postgresql://u:xyzzy%3Fwombat@h:1/x"
    assert db.psycopg_url == "postgresql+psycopg://u:xyzzy%3Fwombat@h:1/x"


def test_build_url_round_trips_through_both_parsers() -> None:
    """Built URLs mean the same to libpq and to SQLAlchemy, whatever the password."""
    for password in ("xyzzy?wombat", "xy@zzy/wo#mb:at", "xyzzy wombat€", "a%40b"):
        url = pg_dsn.build_url("postgresql", {"user": "u", "password": password, "host": "h"})
        parsed = pg_dsn.parse(url)
        assert not parsed.ambiguous
        assert parsed.params is not None
        assert parsed.params["password"] == password
        assert parsed.sa_params is not None
        assert parsed.sa_params["password"] == password


def test_passfile_env() -> None:
    url = "postgresql+psycopg2://u:xyzzy:wom\\bat@127.0.0.1:5999/db"
    with pg.passfile_env(url) as (public, env):
        _assert_clean(public + repr(env))
        assert public == "postgresql+psycopg2://u@127.0.0.1:5999/db"
        path = env["PGPASSFILE"]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        with open(path, encoding="utf-8") as fh:
            assert fh.read() == "127.0.0.1:5999:*:u:xyzzy\\:wom\\\\bat\n"
    assert not os.path.exists(os.path.dirname(path))
    with pg.passfile_env("postgresql://u@h/db") as (public, env):
        assert (public, env) == ("postgresql://u@h/db", {})
    with (
        pytest.raises(ValueError, match="sslpassword") as info,
        pg.passfile_env("postgresql://u@h/db?sslpassword=xyzzywombat"),
    ):
        pass
    _assert_clean(str(info.value))


@pytest.mark.slow
def test_pytest_header_masks_a_working_password(pg_server: pg.Server) -> None:
    """The header names the server, its version and the DSN with the password hidden."""
    params = pg_dsn.parse(pg_server.dsn).params
    assert params is not None
    secret = params.get("password") or "xyzzy-wombat"  # a trusting server ignores it
    url = pg_dsn.build_url("postgresql", {**params, "password": secret})
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only",
         "tests/test_dsn.py::test_reprs_are_masked"],
        cwd=REPO, env={**os.environ, pg.ENV_VAR: url}, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"PostgreSQL {pg_server.version} from SCOPING_DSN: {pg.mask_dsn(url)}" in done.stdout
    assert ":***@" in done.stdout
    assert secret not in done.stdout + done.stderr
