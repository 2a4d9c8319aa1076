"""Find or start the PostgreSQL server that the tests and the stress harness use.

One order, used everywhere (pytest, ``python -m stress``, CI):

1. an explicit DSN: the ``dsn`` argument (``--dsn``), else the ``SCOPING_DSN``
   environment variable. A DSN that does not work raises :class:`BadDsn`; it is
   never a reason to fall through to the next step;
2. the docker compose service on 127.0.0.1:5433 (``docker compose up -d postgres``);
3. a local server on 127.0.0.1:5432 that trusts user ``postgres`` (or the
   current OS user);
4. a throwaway cluster started from the PostgreSQL binaries (``initdb`` and
   ``pg_ctl`` on PATH or in ``/usr/lib/postgresql/*/bin``) in a temporary
   directory, on a free port, as an unprivileged user when run as root. It lives
   for the ``with`` block and is stopped and deleted at the end, also on Ctrl-C,
   SIGTERM, SIGHUP and interpreter exit. Only SIGKILL leaks it;
5. otherwise :class:`PostgresUnavailable`, whose message lists every way to get
   a server.

Steps 2 and 3 are quick probes (2 s connect timeout; a closed port is refused
at once). ``throwaway=True`` skips steps 1 to 3. Starting a throwaway cluster
costs about 1 to 3 s (``initdb`` plus start-up).

Example::

    with postgres_database() as db:          # CREATE DATABASE scoping_<pid>_<hex>
        engine = sqlalchemy.create_engine(db.url)
        ...                                  # dropped at the end

psycopg2 is imported inside functions, so importing this module costs nothing
and is safe before ``gevent.monkey.patch_all()``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import getpass
import glob
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import typing as t
from urllib.parse import quote, unquote, urlencode, urlsplit

if t.TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import FrameType

    from psycopg2.extensions import connection as PgConnection

__all__ = [
    "COMPOSE_DSN",
    "COMPOSE_UP",
    "ENV_VAR",
    "LOCAL_DSN",
    "THROWAWAY_MAX_CONNECTIONS",
    "BadDsn",
    "Database",
    "PostgresUnavailable",
    "Server",
    "find_bindir",
    "find_server",
    "how_to_get_a_server",
    "locate_server",
    "mask_dsn",
    "postgres_database",
    "temporary_database",
    "throwaway_server",
]

log = logging.getLogger(__name__)

#: Environment variable holding an explicit DSN (step 1, after the ``dsn`` argument).
ENV_VAR = "SCOPING_DSN"
#: Step 2: the ``postgres`` service of docker-compose.yml, as seen from the host.
COMPOSE_DSN = "postgresql://postgres@127.0.0.1:5433/postgres"
#: Step 3: a server installed on this machine.
LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
#: The command that starts the compose service; quoted in every "no server" message.
COMPOSE_UP = "docker compose up -d postgres"
#: Step 4: enough connections for the stress harness (many pools, many greenlets).
THROWAWAY_MAX_CONNECTIONS = 300

_PROBE_TIMEOUT = 2  # seconds, steps 2 and 3; libpq does not honour less than 2
_EXPLICIT_TIMEOUT = 10  # seconds, step 1, unless the DSN sets connect_timeout
_START_TIMEOUT = 60.0  # seconds for a throwaway cluster to accept connections
_THROWAWAY_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": str(THROWAWAY_MAX_CONNECTIONS),
    "shared_buffers": "'32MB'",
    # Throwaway data: durability buys nothing and costs time on a shared machine.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


# --------------------------------------------------------------------------- errors


class PostgresUnavailable(Exception):
    """No PostgreSQL server was found or started; the message lists the ways to get one.

    ``tried`` holds one line per step that was attempted and why it did not work.
    """

    def __init__(self, message: str, tried: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.tried = tuple(tried)


class BadDsn(PostgresUnavailable):
    """An explicit DSN does not work: one line naming the masked DSN and what to fix."""


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


def _unavailable(tried: Sequence[str]) -> PostgresUnavailable:
    lines = ["No PostgreSQL server found."]
    lines += [f"  tried {line}" for line in tried]
    lines.append(how_to_get_a_server())
    return PostgresUnavailable("\n".join(lines), tried)


# --------------------------------------------------------------------------- masking

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)(.*)$", re.S)
_QUERY_PASSWORD_RE = re.compile(r"(?i)([?&]password=)[^&#]*")
_KV_PASSWORD_RE = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)")


def _userinfo_end(rest: str) -> int:
    """Index of the ``@`` ending the userinfo of a URL tail, or -1.

    The last ``@`` before the query: masking too much is harmless, too little leaks.
    """
    query = rest.find("?")
    return rest.rfind("@", 0, len(rest) if query < 0 else query)


def mask_dsn(dsn: str) -> str:
    """Return ``dsn`` with every password replaced by ``***``.

    Handles URLs (``postgresql://user:pw@host/db``, ``?password=pw``, SQLAlchemy
    ``postgresql+psycopg2://`` URLs) and key=value strings (``password=pw``,
    ``password='p w'``).
    """
    match = _SCHEME_RE.match(dsn)
    if match is None:
        return _KV_PASSWORD_RE.sub(r"\1***", dsn)
    scheme, rest = match.groups()
    at = _userinfo_end(rest)
    if at >= 0 and ":" in rest[:at]:
        rest = rest[:at].split(":", 1)[0] + ":***" + rest[at:]
    return scheme + _QUERY_PASSWORD_RE.sub(r"\1***", rest)


def _passwords_in(dsn: str) -> list[str]:
    """The password literals written in ``dsn`` (raw and URL-decoded), longest first."""
    found: list[str] = []
    match = _SCHEME_RE.match(dsn)
    if match is not None:
        rest = match.group(2)
        at = _userinfo_end(rest)
        if at >= 0 and ":" in rest[:at]:
            found.append(rest[:at].split(":", 1)[1])
        found += re.findall(r"(?i)[?&]password=([^&#]*)", rest)
    else:
        for value in re.findall(r"(?i)\bpassword\s*=\s*('(?:[^'\\]|\\.)*'?|\S*)", dsn):
            found += [value, value.strip("'")]
    found += [unquote(p) for p in found]
    return sorted({p for p in found if p}, key=len, reverse=True)


def _scrub(text: str, dsn: str) -> str:
    """``text`` on one line, with ``dsn`` masked and its passwords removed."""
    text = text.replace(dsn, mask_dsn(dsn))
    for password in _passwords_in(dsn):
        text = text.replace(password, "***")
    text = _KV_PASSWORD_RE.sub(r"\1***", text)
    return " ".join(text.split())


# --------------------------------------------------------------------------- values


@dataclasses.dataclass(frozen=True)
class Server:
    """A reachable server. ``dsn`` is a libpq URL to an admin database (e.g. postgres)."""

    dsn: str
    source: str
    version: str

    @property
    def masked(self) -> str:
        """``dsn`` with the password hidden, for logs and headers."""
        return mask_dsn(self.dsn)


@dataclasses.dataclass(frozen=True)
class Database:
    """One database created for this run; ``url`` is a SQLAlchemy psycopg2 URL to it."""

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
        return "postgresql://" + self.url.split("://", 1)[1]

    @property
    def psycopg_url(self) -> str:
        """SQLAlchemy URL for psycopg 3 (``postgresql+psycopg://...``)."""
        return "postgresql+psycopg://" + self.url.split("://", 1)[1]


def _build_url(scheme: str, params: dict[str, str]) -> str:
    """A URL from libpq parameters; a socket directory host goes into the query."""
    params = dict(params)
    user = params.pop("user", "")
    password = params.pop("password", "")
    host = params.pop("host", "")
    port = params.pop("port", "")
    dbname = params.pop("dbname", "")
    auth = quote(user, safe="")
    if password:
        auth += ":" + quote(password, safe="")
    if auth:
        auth += "@"
    netloc = ""
    if host.startswith("/") or "," in host:
        query = {"host": host, **({"port": port} if port else {}), **params}
    else:
        netloc = f"[{host}]" if ":" in host else host
        if port:
            netloc += f":{port}"
        query = params
    url = f"{scheme}://{auth}{netloc}/{quote(dbname, safe='')}"
    if query:
        url += "?" + urlencode(query, safe="/,", quote_via=quote)
    return url


def _parse(dsn: str) -> dict[str, str]:
    """libpq parameters of a URL or key=value DSN; raises psycopg2.ProgrammingError."""
    import psycopg2.extensions

    # Accept SQLAlchemy URLs too: postgresql+psycopg2://... means postgresql://...
    dsn = re.sub(r"^postgres(?:ql)?\+[A-Za-z0-9_]+://", "postgresql://", dsn)
    return {str(k): str(v) for k, v in psycopg2.extensions.parse_dsn(dsn).items()}


def _with_dbname(dsn: str, dbname: str, scheme: str) -> str:
    params = _parse(dsn)
    params["dbname"] = dbname
    return _build_url(scheme, params)


# --------------------------------------------------------------------------- connecting


def _connect(params: dict[str, str], timeout: int) -> PgConnection:
    import psycopg2
    import psycopg2.extensions

    params = dict(params)
    params.setdefault("connect_timeout", str(timeout))
    conn = psycopg2.connect(psycopg2.extensions.make_dsn(**params))
    conn.autocommit = True
    return conn


def _describe(conn: PgConnection, params: dict[str, str], source: str) -> Server:
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
    return Server(dsn=_build_url("postgresql", normal), source=source, version=version)


def _can_create_databases(conn: PgConnection) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user")
        row = cur.fetchone()
    return bool(row and row[0])


_DSN_FORMS = (
    "write it as postgresql://USER[:PASSWORD]@HOST:PORT/DBNAME "
    "or 'host=HOST port=PORT user=USER dbname=DBNAME'"
)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _diagnose(message: str, params: dict[str, str]) -> tuple[str, str]:
    """(what is wrong, how to fix it) for a libpq connection error message."""
    low = message.lower()
    host = params.get("host", "localhost")
    where = f"{host}:{params.get('port', '5432')}"
    user = params.get("user", getpass.getuser())
    db = params.get("dbname", user)
    if "invalid" in low and ("dsn" in low or "connection option" in low):
        return "malformed DSN", _DSN_FORMS
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
    if any(
        s in low
        for s in ("refused", "timeout expired", "could not connect", "no such file", "unreachable")
    ):
        return (
            f"nothing accepts connections at {where}",
            "start the server there, or fix host/port in the DSN",
        )
    return "cannot connect", "fix the DSN"


def _bad(source: str, dsn: str, problem: str, detail: str, fix: str) -> BadDsn:
    line = f"{source} {mask_dsn(dsn)}: {problem} ({_scrub(detail, dsn)}); fix: {fix}"
    return BadDsn(" ".join(line.split()))


def _explicit(dsn: str, source: str) -> Server:
    """Step 1: the DSN must work; any problem is a BadDsn."""
    import psycopg2

    try:
        params = _parse(dsn)
    except psycopg2.ProgrammingError as exc:
        raise _bad(
            source,
            dsn,
            "malformed DSN",
            _first_line(exc),
            _DSN_FORMS,
        ) from None
    try:
        conn = _connect(params, _EXPLICIT_TIMEOUT)
    except psycopg2.Error as exc:
        problem, fix = _diagnose(str(exc), params)
        raise _bad(source, dsn, problem, _first_line(exc), fix) from None
    try:
        return _describe(conn, params, source)
    finally:
        conn.close()


def _probe(dsn: str, label: str, users: Sequence[str]) -> tuple[Server | None, str]:
    """Steps 2 and 3: a quick try; returns (server, "") or (None, why not)."""
    import psycopg2

    reason = ""
    for user in users:
        params = _parse(dsn)
        params["user"] = user
        try:
            conn = _connect(params, _PROBE_TIMEOUT)
        except psycopg2.Error as exc:
            problem, _ = _diagnose(str(exc), params)
            reason = f"{label} as {user}: {problem}"
            if "nothing accepts connections" in problem or "unknown host" in problem:
                break  # another user will not help
            continue
        try:
            if not _can_create_databases(conn):
                reason = f"{label} as {user}: may not create databases"
                continue
            return _describe(conn, params, label), ""
        finally:
            conn.close()
    return None, reason


def _require_psycopg2() -> None:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        raise PostgresUnavailable(
            "psycopg2 is not installed; fix: pip install psycopg2-binary "
            "(or the project's extra: pip install -e '.[postgres]')"
        ) from None


def _where(dsn: str) -> str:
    parts = urlsplit(dsn)
    return f"{parts.hostname}:{parts.port or 5432}"


def locate_server(dsn: str | None = None) -> Server:
    """Steps 1 to 3 (explicit DSN, compose service, local server); starts nothing.

    Raises BadDsn when an explicit DSN does not work and PostgresUnavailable when
    steps 2 and 3 find nothing (``.tried`` says why).
    """
    _require_psycopg2()
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
        raise _unavailable(tried)
    log.info("PostgreSQL: using %s %s (%s)", server.source, server.masked, server.version)
    return server


# --------------------------------------------------------------------------- throwaway


def find_bindir() -> str | None:
    """Directory holding initdb, pg_ctl and postgres: PATH first, then the newest
    ``/usr/lib/postgresql/*/bin``, then ``/usr/local/pgsql/bin``; None if absent."""
    names = ("initdb", "pg_ctl", "postgres")

    def complete(directory: str) -> bool:
        return all(os.access(os.path.join(directory, n), os.X_OK) for n in names)

    on_path = shutil.which("pg_ctl")
    candidates: list[str] = []
    if on_path:
        candidates.append(os.path.dirname(os.path.realpath(on_path)))

    def major(path: str) -> tuple[int, ...]:
        digits = re.findall(r"\d+", path)
        return tuple(int(d) for d in digits)

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True)
    candidates.append("/usr/local/pgsql/bin")
    for directory in candidates:
        if complete(directory):
            return directory
    return None


@dataclasses.dataclass
class _Cluster:
    """A throwaway cluster: ``root`` holds data/, the unix socket and postgres.log.

    The postmaster is our own child process (not daemonised by ``pg_ctl start``),
    so we reap it: no zombie is left even where PID 1 does not reap orphans.
    """

    root: str
    bindir: str
    uid: int | None  # run the binaries as this user (we are root), else as ourselves
    gid: int | None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def datadir(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def logfile(self) -> str:
        return os.path.join(self.root, "postgres.log")

    def _options(self) -> dict[str, t.Any]:
        options: dict[str, t.Any] = {
            "cwd": self.root,
            "env": {**{k: v for k, v in os.environ.items() if not k.startswith("PG")},
                    "LC_ALL": "C"},
            "stdin": subprocess.DEVNULL,
            # Own session: a Ctrl-C in the terminal reaches only us, and our cleanup
            # then stops the server in order.
            "start_new_session": True,
        }  # fmt: skip
        if self.uid is not None:
            options.update(user=self.uid, group=self.gid, extra_groups=[])
        return options

    def run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run one of the PostgreSQL binaries to completion, output captured."""
        return subprocess.run(
            [os.path.join(self.bindir, args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **self._options(),
        )

    def spawn(self) -> None:
        """Start the postmaster on ``self.port``; its output goes to postgres.log."""
        with open(self.logfile, "ab") as log_file:
            self.proc = subprocess.Popen(
                [os.path.join(self.bindir, "postgres"), "-D", self.datadir, "-p", str(self.port)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                **self._options(),
            )

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as fh:
                return " | ".join(fh.read().strip().splitlines()[-lines:])
        except OSError:
            return ""


# Live clusters by root directory; stopped by the context manager, atexit or a signal.
_LIVE: dict[str, _Cluster] = {}
_PREVIOUS_HANDLERS: dict[int, t.Any] = {}
_ATEXIT_REGISTERED = [False]
_STOP_SIGNALS = ("SIGTERM", "SIGHUP")


def _unprivileged() -> tuple[int, int] | tuple[None, None]:
    """(uid, gid) to run the server as: postgres, else nobody, when we are root."""
    if os.geteuid() != 0:
        return None, None
    import pwd

    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise PostgresUnavailable(
        "Running as root and no unprivileged user (postgres or nobody) exists to run the "
        "throwaway PostgreSQL cluster: create one (useradd postgres) or run as non-root."
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(bindir: str) -> tuple[_Cluster, Server]:
    uid, gid = _unprivileged()
    root = tempfile.mkdtemp(prefix="scoping-pg-")
    cluster = _Cluster(root=root, bindir=bindir, uid=uid, gid=gid)
    _register(cluster)
    try:
        if uid is not None and gid is not None:
            os.chown(root, uid, gid)
        done = cluster.run(
            "initdb", "-D", cluster.datadir, "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"initdb failed in {root}: {_joined(done.stderr or done.stdout)}; "
                "fix: make the temporary directory (TMPDIR) usable by the server user, "
                "or use another way to get a server. " + how_to_get_a_server()
            )
        settings = {**_THROWAWAY_SETTINGS, "unix_socket_directories": f"'{root}'"}
        with open(os.path.join(cluster.datadir, "postgresql.conf"), "a", encoding="utf-8") as fh:
            fh.write("\n# scoping throwaway cluster\n")
            fh.writelines(f"{key} = {value}\n" for key, value in settings.items())
        for attempt in range(3):  # a free port can be taken before the server binds it
            cluster.port = _free_port()
            cluster.spawn()
            try:
                server = _await_ready(cluster)
                break
            except PostgresUnavailable as exc:
                clash = "already in use" in str(exc) or "already in use" in cluster.log_tail(20)
                if attempt == 2 or not clash:
                    raise
                _reap(cluster)
    except BaseException:
        _stop(cluster)
        raise
    return cluster, server


def _joined(text: str, limit: int = 400) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines)[:limit] or "no output"


def _await_ready(cluster: _Cluster) -> Server:
    """Poll connections every 20 ms (no fixed sleep) until the server answers queries."""
    import psycopg2

    assert cluster.proc is not None
    params = {"host": "127.0.0.1", "port": str(cluster.port), "user": "postgres"}
    params["dbname"] = "postgres"
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        try:
            conn = _connect(params, _PROBE_TIMEOUT)
        except psycopg2.OperationalError as exc:
            exited = cluster.proc.poll()
            if exited is not None or time.monotonic() >= deadline:
                state = f"exited with {exited}" if exited is not None else "timed out"
                raise PostgresUnavailable(
                    f"throwaway cluster in {cluster.root} {state}: {_first_line(exc)}; "
                    f"log: {cluster.log_tail()}"
                ) from None
            time.sleep(0.02)
            continue
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW data_directory")
                row = cur.fetchone()
            if row is None or os.path.realpath(row[0]) != os.path.realpath(cluster.datadir):
                # Another server took the port between _free_port() and our bind.
                raise PostgresUnavailable(
                    f"port {cluster.port} already in use by the server of {row and row[0]}"
                )
            return _describe(conn, params, f"throwaway cluster ({cluster.root})")
        finally:
            conn.close()


def _reap(cluster: _Cluster) -> None:
    """Make sure the postmaster has exited and is reaped (SIGKILL after 10 s)."""
    proc, cluster.proc = cluster.proc, None
    if proc is None:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _stop(cluster: _Cluster) -> None:
    """Stop the postmaster (immediate mode), reap it, delete the directory."""
    if cluster.root not in _LIVE:
        return  # already stopped (context manager, atexit and signal all call this)
    # Removed from _LIVE only at the end: a signal arriving mid-way stops it again.
    try:
        if cluster.proc is not None and cluster.proc.poll() is None:
            cluster.run("pg_ctl", "stop", "-D", cluster.datadir, "-m", "immediate", "-w",
                        "-t", "30", timeout=40)  # fmt: skip
        _reap(cluster)
    finally:
        shutil.rmtree(cluster.root, ignore_errors=True)
        _LIVE.pop(cluster.root, None)
        if not _LIVE:
            _restore_handlers()


def _stop_all() -> None:
    for cluster in list(_LIVE.values()):
        try:
            _stop(cluster)
        except Exception:  # keep stopping the others
            log.exception("could not stop throwaway cluster in %s", cluster.root)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    previous = _PREVIOUS_HANDLERS.get(signum, signal.SIG_DFL)
    _stop_all()  # also restores every previous handler
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        os.kill(os.getpid(), signum)  # die of the same signal, with its exit status


def _register(cluster: _Cluster) -> None:
    _LIVE[cluster.root] = cluster
    if not _ATEXIT_REGISTERED[0]:
        atexit.register(_stop_all)
        _ATEXIT_REGISTERED[0] = True
    for name in _STOP_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is None or signum in _PREVIOUS_HANDLERS:
            continue
        try:
            previous = signal.getsignal(signum)
            if previous in (signal.SIG_IGN, None):
                continue  # ignored on purpose, or set outside Python: leave it alone
            signal.signal(signum, _on_signal)
        except ValueError:  # not the main thread: atexit and finally still apply
            continue
        _PREVIOUS_HANDLERS[signum] = previous


def _restore_handlers() -> None:
    for signum, previous in list(_PREVIOUS_HANDLERS.items()):
        try:
            if signal.getsignal(signum) is _on_signal:
                signal.signal(signum, previous)
        except ValueError:
            continue  # not the main thread; try again next time
        del _PREVIOUS_HANDLERS[signum]


@contextlib.contextmanager
def throwaway_server(tried: Sequence[str] = ()) -> Iterator[Server]:
    """Step 4: a fresh cluster for the ``with`` block (about 1 to 3 s to start).

    ``max_connections`` is THROWAWAY_MAX_CONNECTIONS, ``shared_buffers`` 32MB,
    fsync off; it listens on 127.0.0.1 and a unix socket in its temporary
    directory, and trusts every local connection.
    """
    _require_psycopg2()
    bindir = find_bindir()
    if bindir is None:
        tried = [*tried, "throwaway cluster: no initdb/pg_ctl on PATH or in "
                 "/usr/lib/postgresql/*/bin"]  # fmt: skip
        raise _unavailable(tried)
    cluster, server = _start(bindir)
    log.info("PostgreSQL: using %s %s (%s)", server.source, server.masked, server.version)
    try:
        yield server
    finally:
        _stop(cluster)


# --------------------------------------------------------------------------- public API


@contextlib.contextmanager
def find_server(dsn: str | None = None, *, throwaway: bool = False) -> Iterator[Server]:
    """The first server of the module's order; a throwaway cluster lives for the block."""
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
    with throwaway_server(tried) as server:
        yield server


_PREFIX_RE = re.compile(r"[a-z_][a-z0-9_]{0,39}")


@contextlib.contextmanager
def temporary_database(server: Server, *, prefix: str = "scoping") -> Iterator[Database]:
    """``CREATE DATABASE <prefix>_<pid>_<hex>`` on ``server``, dropped at the end.

    Leftover connections are terminated before the drop.
    """
    _require_psycopg2()
    import psycopg2
    from psycopg2 import sql

    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"prefix {prefix!r} must match {_PREFIX_RE.pattern}")
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    conn = _connect(_parse(server.dsn), _EXPLICIT_TIMEOUT)
    try:
        with conn.cursor() as cur:
            # template0: nobody is ever connected to it, so concurrent runs do not collide.
            cur.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
            )
    except psycopg2.errors.InsufficientPrivilege:
        raise PostgresUnavailable(
            f"{server.source} {server.masked}: the user may not create databases; fix: use "
            "a superuser or grant it (ALTER ROLE <user> CREATEDB)"
        ) from None
    finally:
        conn.close()
    database = Database(
        server=server, name=name, url=_with_dbname(server.dsn, name, "postgresql+psycopg2")
    )
    log.info("PostgreSQL: created database %s on %s", name, server.source)
    try:
        yield database
    finally:
        _drop(server, name)


def _drop(server: Server, name: str) -> None:
    from psycopg2 import sql

    conn = _connect(_parse(server.dsn), _EXPLICIT_TIMEOUT)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            force = sql.SQL(" WITH (FORCE)") if conn.server_version >= 130000 else sql.SQL("")
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}{}").format(sql.Identifier(name), force))
    finally:
        conn.close()
    log.info("PostgreSQL: dropped database %s", name)


@contextlib.contextmanager
def postgres_database(
    dsn: str | None = None, *, throwaway: bool = False, prefix: str = "scoping"
) -> Iterator[Database]:
    """find_server() plus a fresh database on it, dropped (and the cluster stopped) at the end."""
    with (
        find_server(dsn, throwaway=throwaway) as server,
        temporary_database(server, prefix=prefix) as database,
    ):
        yield database
