"""Steps 1 to 3 of the search, and the entry points that add step 4.

1. an explicit DSN: the ``dsn`` argument (``--dsn``), else the ``SCOPING_DSN``
   environment variable. A DSN that does not work raises :class:`BadDsn`; it is
   never a reason to fall through to the next step;
2. the docker compose service on 127.0.0.1:5433 (``docker compose up -d postgres``);
3. a local server on 127.0.0.1:5432 that trusts user ``postgres`` (or the
   current OS user) and lets it create databases;
4. a throwaway cluster (:mod:`stress.postgres.cluster`).

Steps 2 and 3 are quick probes (2 s connect timeout; a closed port is refused at
once). Nothing here writes anything; :func:`find_server` may start a cluster and
:func:`postgres_database` adds a database that is dropped at the end.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import typing as t

from . import cluster as _cluster
from .databases import Database, temporary_database
from .dsn import mask_dsn, parse, scrub
from .errors import ENV_VAR, BadDsn, PostgresUnavailable, unavailable
from .server import (
    ADMIN_TIMEOUT,
    DSN_FORMS,
    PROBE_TIMEOUT,
    Server,
    can_create_databases,
    connect,
    describe,
    diagnose,
    first_line,
    require_psycopg2,
)

if t.TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = [
    "COMPOSE_DSN",
    "LOCAL_DSN",
    "find_server",
    "locate_server",
    "postgres_database",
]

log = logging.getLogger("stress.postgres")

#: Step 2: the ``postgres`` service of docker-compose.yml, as seen from the host.
COMPOSE_DSN = "postgresql://postgres@127.0.0.1:5433/postgres"
#: Step 3: a server installed on this machine.
LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _bad(source: str, dsn: str, problem: str, detail: str, fix: str) -> BadDsn:
    detail = f" ({scrub(detail, dsn)})" if detail else ""
    line = f"{source} {mask_dsn(dsn)}: {problem}{detail}; fix: {fix}"
    return BadDsn(" ".join(line.split()))


def _explicit(dsn: str, source: str) -> Server:
    """Step 1: the DSN must work; any problem is a BadDsn (raised unchained)."""
    import psycopg2

    parsed = parse(dsn)
    if not parsed.is_postgres:
        raise _bad(
            source,
            dsn,
            f"not a PostgreSQL URL (scheme {parsed.scheme})",
            "",
            "pass a postgresql:// URL, e.g. postgresql://USER@HOST:PORT/postgres "
            "(a SQLAlchemy postgresql+DRIVER:// URL works too)",
        )
    if parsed.disagree:
        raise _bad(
            source,
            dsn,
            "ambiguous DSN: libpq and SQLAlchemy read its user, password, host or "
            "database differently",
            "",
            "percent-encode the special characters of the user name and password "
            "(urllib.parse.quote(password, safe='')), e.g. a/b as a%2Fb",
        )
    if parsed.params is None or parsed.misplaced:
        detail = (
            parsed.error or "the host or port holds a URL delimiter, or the port is not a number"
        )
        raise _bad(source, dsn, "malformed DSN", detail, DSN_FORMS)
    params = parsed.params
    failure: BadDsn | None = None
    try:
        conn = connect(params, ADMIN_TIMEOUT)
    except psycopg2.Error as exc:
        problem, fix = diagnose(str(exc), params)
        failure = _bad(source, dsn, problem, first_line(exc), fix)
    if failure is not None:
        raise failure  # outside the except block: no driver error chained to it
    try:
        return describe(conn, params, source)
    finally:
        conn.close()


def _probe(dsn: str, label: str, users: Sequence[str]) -> tuple[Server | None, str]:
    """Steps 2 and 3: a quick try; returns (server, "") or (None, why not)."""
    import psycopg2

    reason = ""
    for user in users:
        params = dict(parse(dsn).params or {})
        params["user"] = user
        try:
            conn = connect(params, PROBE_TIMEOUT)
        except psycopg2.Error as exc:
            problem, _ = diagnose(str(exc), params)
            reason = f"{label} as {user}: {problem}"
            if "nothing accepts connections" in problem or "unknown host" in problem:
                break  # another user will not help
            continue
        try:
            if not can_create_databases(conn):
                reason = f"{label} as {user}: may not create databases"
                continue
            return describe(conn, params, label), ""
        finally:
            conn.close()
    return None, reason


def _where(dsn: str) -> str:
    params = parse(dsn).params or {}
    return f"{params.get('host', 'localhost')}:{params.get('port', '5432')}"


def locate_server(dsn: str | None = None) -> Server:
    """Steps 1 to 3 (explicit DSN, compose service, local server); starts nothing.

    Raises BadDsn when an explicit DSN does not work and PostgresUnavailable when
    steps 2 and 3 find nothing (``.tried`` says why).
    """
    require_psycopg2()
    if dsn:
        server = _explicit(dsn, "--dsn")
    elif os.environ.get(ENV_VAR):
        server = _explicit(os.environ[ENV_VAR], ENV_VAR)
    else:
        tried = [f"explicit DSN (--dsn / {ENV_VAR}): not set"]
        local_users = ["postgres", getpass.getuser()]
        for label, candidate, users in (
            (f"compose service {_where(COMPOSE_DSN)}", COMPOSE_DSN, ["postgres"]),
            (f"local server {_where(LOCAL_DSN)}", LOCAL_DSN, local_users),
        ):
            found, reason = _probe(candidate, label, list(dict.fromkeys(users)))
            if found is not None:
                log.info("PostgreSQL: using %s %s (%s)", found.source, found.masked, found.version)
                return found
            tried.append(reason)
        raise unavailable(tried)
    log.info("PostgreSQL: using %s %s (%s)", server.source, server.masked, server.version)
    return server


@contextlib.contextmanager
def find_server(dsn: str | None = None, *, throwaway: bool = False) -> Iterator[Server]:
    """The first server of the search order; a throwaway cluster lives for the block.

    ``throwaway=True`` skips steps 1 to 3 (even a set ``SCOPING_DSN``).
    """
    tried: Sequence[str] = ("steps 1-3: skipped (throwaway requested)",)
    if not throwaway:
        try:
            server = locate_server(dsn)
        except BadDsn:
            raise
        except PostgresUnavailable as exc:
            tried = exc.tried
        else:
            yield server
            return
    with _cluster.throwaway_server(tried) as server:
        yield server


@contextlib.contextmanager
def postgres_database(
    dsn: str | None = None, *, throwaway: bool = False, prefix: str = "scoping"
) -> Iterator[Database]:
    """:func:`find_server` plus a fresh database on it.

    The ``with`` statement nests them so that the database is dropped before a
    throwaway cluster is stopped, on a normal exit, an exception, Ctrl-C or SIGTERM.
    """
    with (
        find_server(dsn, throwaway=throwaway) as server,
        temporary_database(server, prefix=prefix) as database,
    ):
        yield database
