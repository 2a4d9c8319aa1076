"""A reachable server (:class:`Server`) and the connection helpers the other modules share.

psycopg2 is imported inside functions: importing this module costs nothing and is
safe before ``gevent.monkey.patch_all()``.
"""

from __future__ import annotations

import dataclasses
import getpass
import typing as t

from .dsn import build_url, mask_dsn, parse, scrub
from .errors import PostgresUnavailable

if t.TYPE_CHECKING:
    from collections.abc import Mapping

    from psycopg2.extensions import connection as PgConnection

__all__ = ["Server", "connect", "describe", "diagnose", "first_line", "params_of"]

#: libpq ignores a connect_timeout below 2 seconds.
PROBE_TIMEOUT = 2
#: Seconds for an explicit DSN and for admin connections, unless the DSN sets its own.
ADMIN_TIMEOUT = 10


@dataclasses.dataclass(frozen=True, repr=False)
class Server:
    """A reachable server. ``dsn`` is a libpq URL to an admin database (e.g. postgres).

    ``dsn`` may hold a password (an explicit DSN that has one): never print it, use
    ``masked``; ``repr()`` shows only the masked form. A throwaway cluster's ``dsn``
    has no password: it points at a unix socket in a 0700 directory.
    """

    dsn: str
    source: str
    version: str

    @property
    def masked(self) -> str:
        """``dsn`` with the password hidden, for logs and headers."""
        return mask_dsn(self.dsn)

    def __repr__(self) -> str:
        return f"Server(dsn={self.masked!r}, source={self.source!r}, version={self.version!r})"


def require_psycopg2() -> None:
    """Raise PostgresUnavailable (naming the fix) when psycopg2 is missing."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        raise PostgresUnavailable(
            "psycopg2 is not installed; fix: pip install psycopg2-binary "
            "(or the project's extra: pip install 'sqlalchemy-scoping[postgres]')"
        ) from None


def params_of(dsn: str) -> dict[str, str]:
    """libpq parameters of a DSN or SQLAlchemy URL; ValueError (masked) if unusable."""
    parsed = parse(dsn)
    if parsed.params is None or parsed.ambiguous or not parsed.is_postgres:
        raise ValueError(f"cannot use {mask_dsn(dsn)}: {parsed.error or 'ambiguous'}")
    return dict(parsed.params)


def connect(params: Mapping[str, str], timeout: int = ADMIN_TIMEOUT) -> PgConnection:
    """An autocommit psycopg2 connection; psycopg2 errors propagate (scrub them!)."""
    import psycopg2
    import psycopg2.extensions

    options = dict(params)
    options.setdefault("connect_timeout", str(timeout))
    conn = psycopg2.connect(psycopg2.extensions.make_dsn(**options))
    conn.autocommit = True
    return conn


def connect_dsn(dsn: str, timeout: int = ADMIN_TIMEOUT) -> PgConnection:
    """:func:`connect` for a DSN; a failure is a PostgresUnavailable with a masked message."""
    import psycopg2

    params = params_of(dsn)
    failure = ""
    try:
        return connect(params, timeout)
    except psycopg2.Error as exc:
        problem, fix = diagnose(str(exc), params)
        failure = f"{mask_dsn(dsn)}: {problem} ({scrub(first_line(exc), dsn)}); fix: {fix}"
    # Raised outside the except block: no chained driver error can quote the DSN.
    raise PostgresUnavailable(failure)


def describe(conn: PgConnection, params: Mapping[str, str], source: str) -> Server:
    """A Server for an open admin connection, with the host/port/user it really used.

    The password and other options of ``params`` are kept: the URL must still log in.
    """
    info = conn.info
    normal = {k: v for k, v in params.items() if k not in ("host", "hostaddr", "port")}
    normal.update(user=info.user, host=info.host, port=str(info.port), dbname=info.dbname)
    with conn.cursor() as cur:
        cur.execute("SHOW server_version")
        row = cur.fetchone()
    version = str(row[0]) if row else "unknown"
    return Server(dsn=build_url("postgresql", normal), source=source, version=version)


def can_create_databases(conn: PgConnection) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user")
        row = cur.fetchone()
    return bool(row and row[0])


DSN_FORMS = (
    "write it as postgresql://USER[:PASSWORD]@HOST:PORT/DBNAME "
    "(percent-encode @ : / ? # in the password) "
    "or 'host=HOST port=PORT user=USER dbname=DBNAME'"
)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (driver messages run long)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def diagnose(message: str, params: Mapping[str, str]) -> tuple[str, str]:
    """(what is wrong, how to fix it) for a libpq connection error message."""
    low = message.lower()
    host = params.get("host", "localhost")
    where = f"{host}:{params.get('port', '5432')}"
    user = params.get("user", getpass.getuser())
    db = params.get("dbname", user)
    if "invalid" in low and ("dsn" in low or "connection option" in low or "value" in low):
        return "malformed DSN", DSN_FORMS
    if "could not translate host name" in low:
        return f"unknown host {host!r}", "fix the host name in the DSN"
    if "database" in low and "does not exist" in low:
        return (
            f"database {db!r} does not exist",
            f"create it (createdb {db}) or point the DSN at an existing admin "
            "database such as /postgres",
        )
    if "role" in low and "does not exist" in low:
        return (
            f"role {user!r} does not exist",
            "use an existing role (e.g. postgres) or create it (createuser)",
        )
    if any(s in low for s in ("password", "authentication", "pg_hba.conf")):
        return (
            f"the server rejected the credentials of user {user!r}",
            "fix user/password in the DSN (or PGPASSWORD / ~/.pgpass), "
            "or allow the user in pg_hba.conf",
        )
    if "permission denied" in low:
        return (
            f"this OS user may not reach the socket at {where}",
            "run as the OS user that owns the socket directory (or root), "
            "or connect over TCP with a password",
        )
    if any(
        s in low
        for s in ("refused", "timeout expired", "could not connect", "no such file", "unreachable")
    ):
        return (
            f"nothing accepts connections at {where}",
            "start the server there, or fix host/port in the DSN",
        )
    return "cannot connect", "fix the DSN"
