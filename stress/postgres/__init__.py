"""Find or start the PostgreSQL server that the tests and the stress harness use.

One order, used everywhere (pytest, ``python -m stress``, the benchmarks, CI):

1. an explicit DSN: the ``dsn`` argument (``--dsn``), else the ``SCOPING_DSN``
   environment variable. A DSN that does not work raises :class:`BadDsn`; it is
   never a reason to fall through to the next step;
2. the docker compose service on 127.0.0.1:5433 (``docker compose up -d postgres``);
3. a local server on 127.0.0.1:5432 that trusts user ``postgres`` (or the
   current OS user);
4. a throwaway cluster started from the PostgreSQL binaries, reachable only by
   this OS user (and root) through a unix socket in a 0700 directory;
5. otherwise :class:`PostgresUnavailable`, whose message lists every way to get
   a server.

One module per concept: :mod:`~stress.postgres.dsn` (parsing and masking),
:mod:`~stress.postgres.locate` (steps 1 to 3), :mod:`~stress.postgres.cluster`
(step 4), :mod:`~stress.postgres.databases` (a database per run, the connection
budget) and :mod:`~stress.postgres.leftovers` (reaping what a killed run left).

Example::

    with postgres_database(prefix="stress") as db:   # CREATE DATABASE stress_<pid>_...
        engine = sqlalchemy.create_engine(db.url)
        ...                                           # dropped at the end

Every message, header and ``repr`` shows DSNs masked. psycopg2 is imported inside
functions: importing this package costs nothing and is safe before
``gevent.monkey.patch_all()``.
"""

from __future__ import annotations

import dataclasses
import typing as t

from .cluster import THROWAWAY_MAX_CONNECTIONS, find_bindir, reap_clusters, throwaway_server
from .databases import (
    ConnectionBudget,
    Database,
    check_connections,
    connection_budget,
    max_connections,
    reap_databases,
    temporary_database,
)
from .dsn import mask_dsn, passfile_env, scrub
from .errors import (
    COMPOSE_UP,
    ENV_VAR,
    BadDsn,
    PostgresUnavailable,
    Terminated,
    TooManyConnections,
    how_to_get_a_server,
)
from .leftovers import Owner, owned_mkstemp, reap_temp_files
from .locate import COMPOSE_DSN, LOCAL_DSN, find_server, locate_server, postgres_database
from .server import Server

if t.TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "COMPOSE_DSN",
    "COMPOSE_UP",
    "ENV_VAR",
    "LOCAL_DSN",
    "THROWAWAY_MAX_CONNECTIONS",
    "BadDsn",
    "ConnectionBudget",
    "Database",
    "Owner",
    "PostgresUnavailable",
    "Reaped",
    "Server",
    "Terminated",
    "TooManyConnections",
    "check_connections",
    "connection_budget",
    "find_bindir",
    "find_server",
    "how_to_get_a_server",
    "locate_server",
    "mask_dsn",
    "max_connections",
    "owned_mkstemp",
    "passfile_env",
    "postgres_database",
    "reap_clusters",
    "reap_databases",
    "reap_leftovers",
    "reap_temp_files",
    "scrub",
    "temporary_database",
    "throwaway_server",
]


@dataclasses.dataclass(frozen=True)
class Reaped:
    """What :func:`reap_leftovers` removed."""

    databases: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.databases or self.clusters or self.files)


def reap_leftovers(
    server: Server | str | None = None,
    *,
    temp_files: Sequence[tuple[str, str]] = (),
) -> Reaped:
    """Remove what earlier runs on this host left when they died (``kill -9``).

    - ``server`` (a :class:`Server` or a DSN): drop its databases made by
      :func:`temporary_database` whose owner process is gone (:func:`reap_databases`);
    - throwaway clusters of gone processes: stop and delete them (:func:`reap_clusters`);
    - ``temp_files``: ``(prefix, suffix)`` pairs of files made with
      :func:`owned_mkstemp`, e.g. ``[("stress-cell-", ".err")]`` (:func:`reap_temp_files`).

    Only things whose name carries the tag of a process that is gone, on this
    host, are touched. Safe to call at every start; costs one query and two
    directory listings.
    """
    clusters = reap_clusters()
    files: list[str] = []
    for prefix, suffix in temp_files:
        files += reap_temp_files(prefix, suffix)
    databases = reap_databases(server) if server is not None else []
    return Reaped(tuple(databases), tuple(clusters), tuple(files))
