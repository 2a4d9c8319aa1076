"""Databases made for one run, and the server's connection budget.

:func:`temporary_database` creates ``<prefix>_<pid>_<start>_<host>_<random>`` (the
owner's tag, see :mod:`stress.postgres.leftovers`) and drops it at the end of the
``with`` block, after terminating connections left open. Before creating one it
drops the databases that earlier runs on this host left behind when they died
(``kill -9``): :func:`reap_databases`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import secrets
import typing as t

from .cluster import THROWAWAY_MAX_CONNECTIONS
from .dsn import build_url, mask_dsn, scrub
from .errors import PostgresUnavailable, TooManyConnections
from .leftovers import Owner
from .server import Server, connect_dsn, first_line, params_of, require_psycopg2

if t.TYPE_CHECKING:
    from collections.abc import Iterator

    from psycopg2.extensions import connection as PgConnection

__all__ = [
    "ConnectionBudget",
    "Database",
    "check_connections",
    "connection_budget",
    "max_connections",
    "reap_databases",
    "temporary_database",
]

log = logging.getLogger("stress.postgres")

_PREFIX_RE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
_PREFIX_MAX = 20  # the name must stay within PostgreSQL's 63 bytes
_RANDOM_HEX = 6


@dataclasses.dataclass(frozen=True, repr=False)
class Database:
    """One database created for this run; ``url`` is a SQLAlchemy psycopg2 URL to it.

    ``url`` holds the server's password if it has one: print ``masked_url``.
    """

    server: Server
    name: str
    url: str

    @property
    def masked_url(self) -> str:
        """``url`` with the password hidden."""
        return mask_dsn(self.url)

    @property
    def dsn(self) -> str:
        """libpq URL (``postgresql://...``) for psycopg2.connect or psql."""
        return self.url_for("")

    @property
    def psycopg_url(self) -> str:
        """SQLAlchemy URL for psycopg 3 (``postgresql+psycopg://...``)."""
        return self.url_for("psycopg")

    def url_for(self, driver: str) -> str:
        """SQLAlchemy URL for ``driver`` (``psycopg2``, ``psycopg``, ``asyncpg``...);
        ``""`` gives the plain libpq URL."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return scheme + "://" + self.url.partition("://")[2]

    def __repr__(self) -> str:
        return f"Database(name={self.name!r}, url={self.masked_url!r}, server={self.server!r})"


def _database_name(prefix: str, owner: Owner) -> str:
    return f"{prefix}_{owner.pid}_{owner.start}_{owner.host}_{secrets.token_hex(_RANDOM_HEX // 2)}"


def _owner_of_database(name: str) -> Owner | None:
    """The owner encoded in a name made by :func:`_database_name`, or None."""
    parts = name.split("_")
    if len(parts) < 5 or len(parts[-1]) != _RANDOM_HEX:
        return None
    if not all(c in "0123456789abcdef" for c in parts[-1]):
        return None
    if not _PREFIX_RE.fullmatch("_".join(parts[:-4])):
        return None
    return Owner.from_parts(parts[-4], parts[-3], parts[-2])


def _admin(server: Server) -> PgConnection:
    try:
        return connect_dsn(server.dsn)
    except PostgresUnavailable as exc:
        message = f"{server.source} {exc}"
    raise PostgresUnavailable(message)


def _drop(conn: PgConnection, name: str) -> None:
    from psycopg2 import sql

    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        force = sql.SQL(" WITH (FORCE)") if conn.server_version >= 130000 else sql.SQL("")
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}{}").format(sql.Identifier(name), force))


def _reap(conn: PgConnection) -> list[str]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT datname FROM pg_database WHERE NOT datistemplate "
            "AND pg_has_role(datdba, 'USAGE') ORDER BY datname"
        )
        names = [str(row[0]) for row in cur.fetchall()]
    dropped = []
    for name in names:
        owner = _owner_of_database(name)
        if owner is None or not owner.is_gone():
            continue
        _drop(conn, name)
        dropped.append(name)
        log.info("PostgreSQL: dropped database %s left by dead process %d", name, owner.pid)
    return dropped


def reap_databases(server: Server | str) -> list[str]:
    """Drop the databases of ``server`` that runs on this host left when they died.

    ``server``: a :class:`Server` or a DSN / SQLAlchemy URL of any database on it.
    Only databases named by :func:`temporary_database` whose owner process is gone
    and which the connecting role owns (or is a member of the owner) are dropped;
    returns their names.
    """
    require_psycopg2()
    dsn = server.dsn if isinstance(server, Server) else server
    conn = connect_dsn(dsn)
    try:
        return _reap(conn)
    finally:
        conn.close()


@contextlib.contextmanager
def temporary_database(
    server: Server, *, prefix: str = "scoping", reap: bool = True
) -> Iterator[Database]:
    """``CREATE DATABASE <prefix>_<pid>_<start>_<host>_<random>`` on ``server``; dropped
    at the end (connections still open to it are terminated first).

    ``prefix``: lower-case letters, digits and single underscores, at most 20
    characters. ``reap``: first drop what dead runs on this host left on the server
    (:func:`reap_databases`). A drop that fails because the server is gone is
    logged, not raised: nothing is left to drop on a stopped throwaway cluster, and
    a later run reaps it from a server that is back.
    """
    require_psycopg2()
    import psycopg2
    from psycopg2 import sql

    if len(prefix) > _PREFIX_MAX or not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(
            f"prefix {prefix!r} must match {_PREFIX_RE.pattern} and have at most "
            f"{_PREFIX_MAX} characters"
        )
    name = _database_name(prefix, Owner.current())
    conn = _admin(server)
    failure = ""
    try:
        if reap:
            _reap(conn)
        with conn.cursor() as cur:
            # template0: nobody is ever connected to it, so concurrent runs do not collide.
            cur.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
            )
    except psycopg2.errors.InsufficientPrivilege:
        failure = (
            f"{server.source} {server.masked}: the user may not create databases; fix: use "
            "a superuser or grant it (ALTER ROLE <user> CREATEDB)"
        )
    except psycopg2.Error as exc:
        failure = f"{server.source} {server.masked}: {scrub(first_line(exc), server.dsn)}"
    finally:
        conn.close()
    if failure:
        raise PostgresUnavailable(failure)
    params = params_of(server.dsn)
    params["dbname"] = name
    database = Database(server=server, name=name, url=build_url("postgresql+psycopg2", params))
    log.info("PostgreSQL: created database %s on %s", name, server.source)
    try:
        yield database
    finally:
        _drop_quietly(server, name)


def _drop_quietly(server: Server, name: str) -> None:
    """Drop ``name``; a server that is gone is logged (masked), never a traceback."""
    import psycopg2

    try:
        conn = connect_dsn(server.dsn)
    except PostgresUnavailable as exc:
        log.warning("PostgreSQL: could not drop database %s: %s", name, exc)
        return
    problem = ""
    try:
        _drop(conn, name)
    except psycopg2.Error as exc:
        problem = scrub(first_line(exc), server.dsn)
    finally:
        conn.close()
    if problem:
        log.warning("PostgreSQL: could not drop database %s: %s", name, problem)
    else:
        log.info("PostgreSQL: dropped database %s", name)


# --------------------------------------------------------------------------- connections


@dataclasses.dataclass(frozen=True)
class ConnectionBudget:
    """How many connections a server takes: ``free`` is what a new run may open.

    ``free = max_connections - reserved - in_use``; ``reserved`` is
    ``superuser_reserved_connections`` (plus ``reserved_connections`` on 16+),
    which ordinary roles cannot use, and ``in_use`` counts every client backend.
    """

    max_connections: int
    reserved: int
    in_use: int

    @property
    def free(self) -> int:
        return max(0, self.max_connections - self.reserved - self.in_use)


def _setting(cur: t.Any, name: str) -> int:
    cur.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,))
    row = cur.fetchone()
    return int(row[0]) if row else 0


def connection_budget(url: str | Server) -> ConnectionBudget:
    """The connection budget of the server at ``url`` (DSN, SQLAlchemy URL or Server)."""
    require_psycopg2()
    dsn = url.dsn if isinstance(url, Server) else url
    conn = connect_dsn(dsn)
    try:
        with conn.cursor() as cur:
            limit = _setting(cur, "max_connections")
            reserved = _setting(cur, "superuser_reserved_connections")
            reserved += _setting(cur, "reserved_connections")
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid()"
            )
            row = cur.fetchone()
    finally:
        conn.close()
    return ConnectionBudget(limit, reserved, int(row[0]) if row else 0)


def max_connections(url: str | Server) -> int:
    """``SHOW max_connections`` of the server at ``url`` (DSN, SQLAlchemy URL or Server)."""
    return connection_budget(url).max_connections


def check_connections(
    url: str | Server, needed: int, *, what: str = "this run"
) -> ConnectionBudget:
    """Raise :class:`TooManyConnections` unless ``needed`` connections fit the server now.

    ``what`` names the setting to change in the message (``"--concurrency 400"``).
    Returns the budget when they fit.
    """
    if needed < 1:
        raise ValueError(f"needed must be at least 1, got {needed}")
    budget = connection_budget(url)
    if needed <= budget.free:
        return budget
    dsn = url.dsn if isinstance(url, Server) else url
    raise TooManyConnections(
        f"{what} needs {needed} connections but the server at {mask_dsn(dsn)} has "
        f"{budget.free} free (max_connections={budget.max_connections}, "
        f"{budget.reserved} reserved, {budget.in_use} in use); fix: ask for at most "
        f"{budget.free}, or raise max_connections on that server (ALTER SYSTEM SET "
        "max_connections = ...; then restart it), or use a throwaway cluster, which "
        f"allows {THROWAWAY_MAX_CONNECTIONS}",
        needed=needed,
        available=budget.free,
    )
