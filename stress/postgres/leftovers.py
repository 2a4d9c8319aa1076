"""Who owns what this layer leaves on disk or on a server, and reaping it after a crash.

Everything the layer creates carries its owner's *tag*: the process id, that
process's start time and a hash of the host (``<pid>-<start>-<host>``), in the name
itself, so that marking is atomic with creation:

- databases: ``<prefix>_<pid>_<start>_<host>_<random>`` (``stress_4242_8123456_1a2b3c4d_9f8e7d``);
- throwaway clusters: ``$TMPDIR/scoping-pg-<tag>-<random>/``;
- temporary files made with :func:`owned_mkstemp`: ``$TMPDIR/<prefix><tag>-<random><suffix>``.

An owner is *gone* when no process with that pid runs on this host, or the one that
does started at another time (the pid was reused). Something is reaped only when
its owner is gone and its host hash is this host's: a live run, or a run on another
machine that shares the server, is never touched. Things created before tags
existed (no tag) are never reaped.

The start time is the process's start in clock ticks since boot, from
``/proc/<pid>/stat`` (Linux), else ``psutil`` (``create_time``, in 1/100 s); where
neither is available it is 0 and only "no such pid" counts as gone.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import logging
import os
import socket
import stat
import tempfile

__all__ = ["Owner", "owned_mkstemp", "reap_temp_files"]

log = logging.getLogger("stress.postgres")


def _start_time(pid: int) -> int | None:
    """Start time of process ``pid`` (see the module docstring), None if it does not run."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None  # Linux: no such process
    except OSError:
        pass
    else:
        # Field 2 (comm) is in parentheses and may hold spaces: split after the last ')'.
        fields = stat[stat.rindex(b")") + 2 :].split()
        return int(fields[19])  # field 22, starttime
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return 0
        return 0
    try:
        return int(psutil.Process(pid).create_time() * 100)
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:
        return 0


@functools.lru_cache(maxsize=1)
def _host_hash() -> str:
    """8 hex digits naming this host: hostname plus machine-id where there is one."""
    ident = socket.gethostname()
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="ascii") as fh:
                ident += ":" + fh.read().strip()
            break
        except OSError:
            continue
    return hashlib.sha256(ident.encode()).hexdigest()[:8]


@dataclasses.dataclass(frozen=True)
class Owner:
    """The process that created something: pid, start time and host hash."""

    pid: int
    start: int
    host: str

    @classmethod
    def current(cls) -> Owner:
        """This process (computed at each call: a forked child is another owner)."""
        pid = os.getpid()
        return cls(pid=pid, start=_start_time(pid) or 0, host=_host_hash())

    @property
    def tag(self) -> str:
        """``<pid>-<start>-<host>``, as written into file and directory names."""
        return f"{self.pid}-{self.start}-{self.host}"

    @classmethod
    def from_parts(cls, pid: str, start: str, host: str) -> Owner | None:
        """An Owner from the three parts of a tag, or None if they are not one."""
        if not (pid.isdigit() and start.isdigit() and len(host) == 8):
            return None
        if not all(c in "0123456789abcdef" for c in host):
            return None
        return cls(pid=int(pid), start=int(start), host=host)

    def is_local(self) -> bool:
        return self.host == _host_hash()

    def is_gone(self) -> bool:
        """True only if this owner ran on this host and has certainly exited."""
        if not self.is_local():
            return False  # another machine's run: not ours to judge
        if self.pid == os.getpid():
            return False
        start = _start_time(self.pid)
        if start is None:
            return True
        return bool(self.start and start and start != self.start)


def owned_mkstemp(prefix: str, suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` with this process's tag in the name, for :func:`reap_temp_files`.

    The name is ``<prefix><pid>-<start>-<host>-<random><suffix>`` in the temporary
    directory; the file is 0600, as with mkstemp.
    """
    return tempfile.mkstemp(prefix=f"{prefix}{Owner.current().tag}-", suffix=suffix)


def _owner_of_name(name: str, prefix: str, suffix: str) -> Owner | None:
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return None
    middle = name[len(prefix) : len(name) - len(suffix) if suffix else None]
    parts = middle.split("-")
    if len(parts) != 4:
        return None
    return Owner.from_parts(*parts[:3])


def reap_temp_files(prefix: str, suffix: str = "", directory: str | None = None) -> list[str]:
    """Remove files made by :func:`owned_mkstemp` whose owner is gone; the paths removed.

    Only regular files of this user that match ``<prefix><tag>-<random><suffix>``
    are considered; files of live or foreign owners are left alone.
    """
    if not prefix or os.sep in prefix:
        raise ValueError(f"prefix {prefix!r} must be a non-empty file name prefix")
    directory = directory or tempfile.gettempdir()
    removed: list[str] = []
    pattern = os.path.join(glob.escape(directory), glob.escape(prefix) + "*" + glob.escape(suffix))
    for path in glob.glob(pattern):
        owner = _owner_of_name(os.path.basename(path), prefix, suffix)
        if owner is None or not owner.is_gone():
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
        log.info("PostgreSQL layer: removed %s left by dead process %d", path, owner.pid)
    return removed
