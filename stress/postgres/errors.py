"""The layer's exceptions and the one message that lists every way to get a server.

Every message is masked (see :mod:`stress.postgres.dsn`) and none is chained to a
driver error: the driver's message may quote the DSN, so the layer keeps only a
scrubbed first line of it and raises outside the ``except`` block.
"""

from __future__ import annotations

import typing as t

if t.TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "COMPOSE_UP",
    "ENV_VAR",
    "BadDsn",
    "PostgresUnavailable",
    "Terminated",
    "TooManyConnections",
    "how_to_get_a_server",
    "unavailable",
]

#: Environment variable holding an explicit DSN (step 1, after the ``dsn`` argument).
ENV_VAR = "SCOPING_DSN"
#: The command that starts the compose service; quoted in every "no server" message.
COMPOSE_UP = "docker compose up -d postgres"


class PostgresUnavailable(Exception):
    """No PostgreSQL server was found or started; the message lists the ways to get one.

    ``tried`` holds one line per step that was attempted and why it did not work.
    """

    def __init__(self, message: str, tried: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.tried = tuple(tried)


class BadDsn(PostgresUnavailable):
    """An explicit DSN does not work: one line naming the masked DSN and what to fix."""


class TooManyConnections(PostgresUnavailable):
    """A run needs more connections than the server allows; the message names the fix."""

    def __init__(self, message: str, *, needed: int, available: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM or SIGHUP while a throwaway cluster runs.

    It unwinds the stack like Ctrl-C does, so every ``with`` block exits in order
    (a database is dropped before its cluster is stopped), and then ends the
    process with status 128 + the signal number (143 for SIGTERM), without a
    traceback. Set when the signal had its default action; a handler of the
    application's own is called instead.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def how_to_get_a_server() -> str:
    """Every way to get a server, in the order the finder tries them (one line)."""
    return (
        "Ways to get a server: "
        f"(1) pass --dsn postgresql://USER@HOST:PORT/postgres or set {ENV_VAR}; "
        f"(2) run `{COMPOSE_UP}` (serves 127.0.0.1:5433); "
        "(3) run a local server on 127.0.0.1:5432 that trusts user postgres; "
        "(4) install the PostgreSQL server binaries (initdb and pg_ctl on PATH or in "
        "/usr/lib/postgresql/*/bin, e.g. `apt-get install postgresql`) so that a "
        "throwaway cluster can be started."
    )


def unavailable(tried: Sequence[str]) -> PostgresUnavailable:
    """The "no server" error: what was tried, then every way to get one."""
    lines = ["No PostgreSQL server found."]
    lines += [f"  tried {line}" for line in tried]
    lines.append(how_to_get_a_server())
    return PostgresUnavailable("\n".join(lines), tried)
