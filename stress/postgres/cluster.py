"""Step 4: a throwaway PostgreSQL cluster, started for one ``with`` block.

What it is:

- a directory ``$TMPDIR/scoping-pg-<pid>-<start>-<host>-<random>/`` (mode 0700,
  owned by the user the server runs as) holding ``data/``, ``postgres.log`` and
  the unix socket;
- a postmaster that is our own child (not daemonised), run as ourselves, or as
  ``postgres`` (else ``nobody``) when we are root, since PostgreSQL refuses root;
- access: **unix socket only for trust**. The socket lives in the 0700 directory
  (``unix_socket_permissions = 0700`` too), so only the server's user and root can
  reach it. TCP listens on 127.0.0.1 and requires ``scram-sha-256`` for every
  role; the superuser ``postgres`` has a random per-run password that initdb read
  from a 0600 file (``--pwfile``, deleted right after) and that only this process
  keeps in memory. Another OS user can log in neither way. No password appears in
  any command line or environment: ``Server.dsn`` is the socket URL
  ``postgresql://postgres@/postgres?host=<dir>&port=<port>`` and has none.
- ``max_connections`` 300, ``shared_buffers`` 32MB, fsync off (throwaway data).

Cost: about 1 to 3 s to start (initdb and start-up), well under 1 s to stop.

Ending: the ``with`` block stops the postmaster (``pg_ctl stop -m immediate``),
reaps it and deletes the directory, also on Ctrl-C and interpreter exit. On
SIGTERM or SIGHUP the stack unwinds in order (see :class:`Terminated`): any
database made on the cluster is dropped first. A second signal stops every
cluster at once. Only SIGKILL leaves one behind: the next :func:`throwaway_server`
(or :func:`reap_clusters`) stops and deletes the clusters of processes that are
gone. In a forked child the clusters stay the parent's: the child neither stops
them at exit nor on a signal.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import glob
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import typing as t

from .errors import PostgresUnavailable, Terminated, how_to_get_a_server, unavailable
from .leftovers import Owner
from .server import PROBE_TIMEOUT, Server, connect, describe, first_line, require_psycopg2

if t.TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import FrameType

__all__ = [
    "CLUSTER_PREFIX",
    "THROWAWAY_MAX_CONNECTIONS",
    "find_bindir",
    "reap_clusters",
    "throwaway_server",
]

log = logging.getLogger("stress.postgres")

#: Step 4: enough connections for the stress harness (many pools, many greenlets).
THROWAWAY_MAX_CONNECTIONS = 300
#: Name prefix of cluster directories in the temporary directory.
CLUSTER_PREFIX = "scoping-pg-"

_START_TIMEOUT = 60.0  # seconds for a throwaway cluster to accept connections
_STOP_SIGNALS = ("SIGTERM", "SIGHUP")
_THROWAWAY_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_permissions": "0700",
    "password_encryption": "'scram-sha-256'",
    "max_connections": str(THROWAWAY_MAX_CONNECTIONS),
    "shared_buffers": "'32MB'",
    # Throwaway data: durability buys nothing and costs time on a shared machine.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


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
        return tuple(int(d) for d in re.findall(r"\d+", path))

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
    password: str = dataclasses.field(default="", repr=False)
    owner_pid: int = dataclasses.field(default_factory=os.getpid)

    @property
    def datadir(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def logfile(self) -> str:
        return os.path.join(self.root, "postgres.log")

    def socket_params(self) -> dict[str, str]:
        return {"user": "postgres", "host": self.root, "port": str(self.port), "dbname": "postgres"}

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
_UNWINDING: list[int] = []  # signals received; a second one stops everything at once


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


def _write_secret(path: str, text: str, uid: int | None, gid: int | None) -> None:
    """Write ``text`` to a new 0600 file owned by ``uid`` (no window with wider modes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if uid is not None and gid is not None:
            os.fchown(fd, uid, gid)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _start(bindir: str) -> tuple[_Cluster, Server]:
    uid, gid = _unprivileged()
    # mkdtemp: mode 0700; the owner's tag in the name lets a later run reap it.
    root = tempfile.mkdtemp(prefix=f"{CLUSTER_PREFIX}{Owner.current().tag}-")
    cluster = _Cluster(root=root, bindir=bindir, uid=uid, gid=gid)
    cluster.password = secrets.token_urlsafe(32)
    _register(cluster)
    try:
        if uid is not None and gid is not None:
            os.chown(root, uid, gid)
        pwfile = os.path.join(root, "pwfile")
        _write_secret(pwfile, cluster.password + "\n", uid, gid)
        try:
            done = cluster.run(
                "initdb", "-D", cluster.datadir, "-U", "postgres", f"--pwfile={pwfile}",
                "--auth-local=trust", "--auth-host=scram-sha-256",
                "-E", "UTF8", "--locale=C", "--no-sync",
            )  # fmt: skip
        finally:
            os.unlink(pwfile)  # initdb has stored the SCRAM verifier; the secret stays in memory
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
                _reap_child(cluster)
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
    params = cluster.socket_params()
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        failure = ""
        try:
            conn = connect(params, PROBE_TIMEOUT)
        except psycopg2.OperationalError as exc:
            exited = cluster.proc.poll()
            if exited is not None or time.monotonic() >= deadline:
                state = f"exited with {exited}" if exited is not None else "timed out"
                failure = (
                    f"throwaway cluster in {cluster.root} {state}: {first_line(exc)}; "
                    f"log: {cluster.log_tail()}"
                )
            else:
                time.sleep(0.02)
                continue
        if failure:
            raise PostgresUnavailable(failure)
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW data_directory")
                row = cur.fetchone()
            if row is None or os.path.realpath(row[0]) != os.path.realpath(cluster.datadir):
                raise PostgresUnavailable(f"the socket in {cluster.root} answers for {row}")
            return describe(conn, params, f"throwaway cluster ({cluster.root})")
        finally:
            conn.close()


def _reap_child(cluster: _Cluster) -> None:
    """Make sure the postmaster has exited and is reaped (SIGKILL after 10 s)."""
    proc, cluster.proc = cluster.proc, None
    if proc is None:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGTERM/SIGHUP while a cluster is being stopped; delivered right after."""
    signums = {getattr(signal, n) for n in _STOP_SIGNALS if hasattr(signal, n)}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop(cluster: _Cluster) -> None:
    """Stop the postmaster (immediate mode), reap it, delete the directory."""
    if _LIVE.get(cluster.root) is not cluster:
        return  # already stopped (context manager, atexit and signal all call this)
    if cluster.owner_pid != os.getpid():
        _LIVE.pop(cluster.root, None)  # a forked child: the parent's cluster, not ours
        return
    with _signals_blocked():
        # Removed from _LIVE only at the end: if this is interrupted, atexit stops it again.
        try:
            ours = cluster.proc is not None and cluster.proc.poll() is None
            # Also a postmaster started again behind our back (pg_ctl start, a restart test).
            if ours or _running_postmaster(cluster.datadir) is not None:
                cluster.run("pg_ctl", "stop", "-D", cluster.datadir, "-m", "immediate", "-w",
                            "-t", "30", timeout=40)  # fmt: skip
            _reap_child(cluster)
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
    if not any(c.owner_pid == os.getpid() for c in _LIVE.values()):
        # A forked child inherited the handler: act as if it were never installed.
        _LIVE.clear()
        _restore_handlers()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)
        return
    if _UNWINDING:
        # Second signal while unwinding: stop every cluster now and end as asked.
        _stop_all()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        return
    _UNWINDING.append(signum)
    if callable(previous):
        # The application's handler, e.g. one raising KeyboardInterrupt: its unwinding
        # drops databases before their clusters stop.
        previous(signum, frame)
        _UNWINDING.clear()  # reached only if it chose not to end the process
        return
    if previous == signal.SIG_DFL:
        # Unwind in order (databases dropped, then clusters stopped), exit 128 + signum.
        raise Terminated(signum)
    _UNWINDING.clear()


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
    _UNWINDING.clear()


@contextlib.contextmanager
def throwaway_server(tried: Sequence[str] = (), *, reap: bool = True) -> Iterator[Server]:
    """Step 4: a fresh cluster for the ``with`` block (about 1 to 3 s to start).

    ``tried``: what steps 1-3 found, for the message when no cluster can start
    either. ``reap``: first stop and delete clusters that dead processes left
    (:func:`reap_clusters`). The module docstring says what the cluster is, who can
    reach it and how it ends.
    """
    require_psycopg2()
    bindir = find_bindir()
    if bindir is None:
        tried = [*tried, "throwaway cluster: no initdb/pg_ctl on PATH or in "
                 "/usr/lib/postgresql/*/bin"]  # fmt: skip
        raise unavailable(tried)
    if reap:
        reap_clusters()
    cluster, server = _start(bindir)
    log.info("PostgreSQL: using %s %s (%s)", server.source, server.masked, server.version)
    try:
        yield server
    finally:
        _stop(cluster)


# --------------------------------------------------------------------------- reaping


def _cmdline(pid: int) -> list[str] | None:
    """The argv of ``pid``, or None if unknown (no such process, no way to read it)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [part.decode(errors="replace") for part in fh.read().split(b"\0") if part]
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except OSError:
        return None
    try:
        import psutil
    except ImportError:
        return None
    try:
        return list(psutil.Process(pid).cmdline())
    except psutil.Error:
        return None


def _running_postmaster(datadir: str) -> int | None:
    """The pid of a postmaster serving ``datadir`` (checked against its argv), or None."""
    try:
        with open(os.path.join(datadir, "postmaster.pid"), encoding="ascii") as fh:
            pid = int(fh.readline().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    argv = _cmdline(pid)
    if not argv or datadir not in argv:
        return None  # gone, or the pid now belongs to another process
    return pid


def _stop_orphan(pid: int, timeout: float = 30.0) -> bool:
    """SIGQUIT (immediate shutdown) to an orphaned postmaster; True once it is gone."""
    try:
        os.kill(pid, signal.SIGQUIT)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _cmdline(pid):  # gone, or a zombie (empty argv) waiting for init to reap it
            return True
        time.sleep(0.05)
    return False


def _cluster_owner(name: str) -> Owner | None:
    if not name.startswith(CLUSTER_PREFIX):
        return None
    parts = name[len(CLUSTER_PREFIX) :].split("-")
    if len(parts) != 4:
        return None
    return Owner.from_parts(*parts[:3])


def reap_clusters(directory: str | None = None) -> list[str]:
    """Stop and delete throwaway clusters whose owner process is gone; the paths removed.

    Looks in ``directory`` (default: the temporary directory) for
    ``scoping-pg-<tag>-*`` directories owned by the user our clusters run as. A
    postmaster still serving one (it survives a ``kill -9`` of its parent) gets
    SIGQUIT, the immediate shutdown, once its pid is confirmed by its command line.
    Clusters of live processes, of other hosts and of other users are left alone.
    """
    directory = directory or tempfile.gettempdir()
    uid, _ = _unprivileged()
    allowed = {os.geteuid(), uid if uid is not None else os.geteuid()}
    removed: list[str] = []
    pattern = os.path.join(glob.escape(directory), CLUSTER_PREFIX + "*")
    for root in glob.glob(pattern):
        owner = _cluster_owner(os.path.basename(root))
        if owner is None or not owner.is_gone() or root in _LIVE:
            continue
        try:
            st = os.lstat(root)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in allowed:
            continue
        datadir = os.path.join(root, "data")
        pid = _running_postmaster(datadir)
        if pid is not None and not _stop_orphan(pid):
            log.warning("PostgreSQL: could not stop the orphaned cluster in %s (pid %d)", root, pid)
            continue
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
        log.info(
            "PostgreSQL: removed throwaway cluster %s left by dead process %d", root, owner.pid
        )
    return removed
