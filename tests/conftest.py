"""Shared fixtures. PostgreSQL is found or started by ``stress.postgres`` (docs/postgres.md).

Order: ``--dsn`` / ``SCOPING_DSN``, compose service 127.0.0.1:5433, local server
127.0.0.1:5432, then a throwaway cluster started on first use (``--pg-throwaway``
goes straight there). Steps 1-3 are probed once, at header time or on first use;
the header and the terminal summary say which server is used, its version, and
its DSN masked.

No server: tests that need one are skipped, or fail under ``CI=true``. An explicit
DSN that does not work always fails: it is a configuration error, never a skip.

Fixtures: ``pg_server`` (a ``stress.postgres.Server``), ``pg_db`` (one database for
the session), ``pg_url`` (its SQLAlchemy psycopg2 URL), ``pg_env`` (environment for
child processes: ``SCOPING_TEST_DSN`` without a password, plus ``PGPASSFILE`` when
the server needs one), ``pg_engine`` and ``sqlite_url``.
"""

from __future__ import annotations

import contextlib
import os
import typing as t

import pytest

from stress import postgres as pg

if t.TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import sqlalchemy

_PG_FIXTURES = frozenset({"pg_server", "pg_db", "pg_url", "pg_env", "pg_engine"})
#: The variable that docs examples and child processes read their database URL from.
TEST_DSN_VAR = "SCOPING_TEST_DSN"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("postgres", "PostgreSQL for tests marked postgres")
    group.addoption(
        "--dsn",
        default=None,
        help=f"libpq DSN of an admin database (also env {pg.ENV_VAR}); it must work: "
        "there is no fallback to other servers.",
    )
    group.addoption(
        "--pg-throwaway",
        action="store_true",
        default=False,
        help="skip --dsn/compose/local and start a throwaway cluster for the session.",
    )


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


class _PgState:
    """Per-session result of steps 1-3, computed once; the server used, for the summary."""

    def __init__(self, config: pytest.Config) -> None:
        self.dsn: str | None = config.getoption("--dsn")
        self.throwaway: bool = config.getoption("--pg-throwaway")
        self.located = False
        self.server: pg.Server | None = None
        self.error: pg.PostgresUnavailable | None = None
        self.used: pg.Server | None = None

    def locate(self) -> None:
        if self.located:
            return
        self.located = True
        if self.throwaway:
            self.error = pg.PostgresUnavailable(
                "throwaway requested", ["steps 1-3: skipped (--pg-throwaway)"]
            )
            return
        try:
            self.server = pg.locate_server(self.dsn)
        except pg.PostgresUnavailable as exc:
            self.error = exc


_STATE = pytest.StashKey[_PgState]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STATE] = _PgState(config)


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash[_STATE]
    state.locate()
    if state.server is not None:
        server = state.server
        return [f"PostgreSQL {server.version} from {server.source}: {server.masked}"]
    if isinstance(state.error, pg.BadDsn):
        return [f"PostgreSQL: {state.error}"]
    bindir = pg.find_bindir()
    tried = "; ".join(state.error.tried) if state.error else ""
    if bindir is not None:
        return [f"PostgreSQL: {tried}; a throwaway cluster from {bindir} starts on first use"]
    outcome = "fail (CI=true)" if _in_ci() else "be skipped"
    return [f"PostgreSQL: none ({tried}; no initdb/pg_ctl); postgres tests will {outcome}"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests using a PostgreSQL fixture get the ``postgres`` marker (for ``-m``)."""
    for item in items:
        if _PG_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


def pytest_terminal_summary(terminalreporter: t.Any, config: pytest.Config) -> None:
    used = config.stash[_STATE].used
    if used is not None:
        terminalreporter.write_line(
            f"PostgreSQL used: {used.version} from {used.source}: {used.masked}"
        )


def _no_server(exc: pg.PostgresUnavailable) -> t.NoReturn:
    """Fail (CI, or a bad explicit DSN) or skip with the finder's message."""
    if isinstance(exc, pg.BadDsn) or _in_ci():
        pytest.fail(str(exc), pytrace=False)
    if exc.tried:
        pytest.skip(
            f"no PostgreSQL server (tried {'; '.join(exc.tried)}). {pg.how_to_get_a_server()}"
        )
    pytest.skip(" ".join(str(exc).split()))


@pytest.fixture(scope="session")
def pg_server(pytestconfig: pytest.Config) -> Iterator[pg.Server]:
    """The session's server (steps 1-3, else a throwaway cluster stopped at session end)."""
    state = pytestconfig.stash[_STATE]
    state.locate()
    if state.server is not None:
        state.used = state.server
        yield state.server
        return
    if isinstance(state.error, pg.BadDsn):
        _no_server(state.error)
    tried = state.error.tried if state.error else ()
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(pg.throwaway_server(tried))
        except pg.PostgresUnavailable as exc:
            _no_server(exc)
        state.used = server
        yield server


@pytest.fixture(scope="session")
def pg_db(pg_server: pg.Server) -> Iterator[pg.Database]:
    """One fresh database for the whole test session, dropped at the end."""
    with pg.temporary_database(pg_server) as database:
        yield database


@pytest.fixture(scope="session")
def pg_url(pg_db: pg.Database) -> str:
    """SQLAlchemy URL (``postgresql+psycopg2://``) of the session database."""
    return pg_db.url


@pytest.fixture(scope="session")
def pg_env(pg_url: str) -> Iterator[dict[str, str]]:
    """Environment to add to a child process's so it can reach the session database.

    ``SCOPING_TEST_DSN`` is ``pg_url`` without its password; when there is one it
    sits in a libpq password file (0600, removed at session end) named by
    ``PGPASSFILE``, which psycopg2, psycopg and asyncpg read. So neither the child's
    argv nor its environment holds the secret. Use ``env={**os.environ, **pg_env}``.
    """
    with pg.passfile_env(pg_url) as (public_url, env):
        yield {TEST_DSN_VAR: public_url, **env}


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[sqlalchemy.Engine]:
    """A psycopg2 Engine (pool_size=5) on the session database, disposed after the test."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(pg_url, pool_size=5)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A file-based SQLite URL, for tests that must run without a server."""
    return f"sqlite:///{tmp_path / 'test.db'}"
