"""The doctor: find Session-scoping hazards in the *running* process.

``diagnose()`` looks at what this process has already imported and built: it
never imports gevent, psycopg2 or SQLAlchemy itself, and never patches
anything, so it is safe to call from a gunicorn hook, an app factory or a
debug endpoint::

    import scoping.doctor

    def post_worker_init(worker):      # gunicorn.conf.py
        scoping.doctor.check()         # raises UnsafeProcess on any hazard

What it reports (each finding has a severity ``ok``/``info``/``warning``/
``hazard``, a title, the detail and the fix):

- gevent: installed, imported, which modules ``monkey.patch_all()`` patched;
- greenlet and Python versions, and whether each greenlet has its own
  contextvars context (greenlet >= 0.4.17);
- psycopg2: which wait callback is installed (none under gevent blocks the hub);
- every live ``sqlalchemy.orm.scoped_session`` (found with ``gc``), named after
  the module global that holds it when there is one, and whether its registry
  hands one Session to every greenlet;
- every live Engine whose pool locks were built before ``patch_all()``;
- every live Engine whose pool holds connections that another process opened
  (a pool connected before ``fork()``: gunicorn ``--preload`` with a warm-up
  query, Celery prefork, multiprocessing). Both processes then talk on one
  socket; the fix is ``scoping.fork.dispose_engines()`` in the child;
- the scope to use (``thread``, ``greenlet`` or ``contextvar``) and why.

``python -m scoping doctor --demo`` (:func:`run_demo`) runs a child process
built wrong on purpose and shows the doctor catching it.

Fork, threads and greenlets: ``diagnose()`` holds nothing between calls, so it
is safe in a forked child, any thread or greenlet; call it in the process you
want to check (after the fork: gunicorn's ``post_worker_init``, Celery's
``worker_process_init``).

Cost: one pass over ``gc.get_objects()`` and one over the globals of every
module in ``sys.modules``; tens of milliseconds in a typical app, more in a
process with millions of objects. Call it once at start-up, not per request.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import types
import typing as t
from importlib import metadata
from pathlib import Path

from scoping import _units
from scoping.errors import ScopingError

__all__ = [
    "Diagnosis",
    "Finding",
    "Severity",
    "UnsafeProcess",
    "check",
    "diagnose",
    "run_demo",
]

Severity = t.Literal["ok", "info", "warning", "hazard"]

#: Severities from least to most serious.
SEVERITIES: tuple[Severity, ...] = ("ok", "info", "warning", "hazard")

# Module names that gevent.monkey.patch_all() may patch (keys of
# gevent.monkey.saved on gevent 26.9; "_thread" is the key for the thread module).
_PATCHABLE = (
    "socket",
    "ssl",
    "select",
    "selectors",
    "_thread",
    "threading",
    "time",
    "os",
    "signal",
    "subprocess",
    "queue",
    "sys",
    "builtins",
)

_FIX_GREENLET_SCOPE = (
    'build it with scoping.scoped_session(factory, scope="greenlet") (or scope="auto"), '
    "or build the scoped_session after gevent.monkey.patch_all()"
)
_FIX_PSYCOPG2 = (
    "call scoping.green.patch_psycopg2() right after gevent.monkey.patch_all(), "
    "before the first query"
)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing the doctor checked: what it found and what to do about it."""

    severity: Severity
    code: str
    title: str
    detail: str = ""
    fix: str = ""
    subject: str | None = None

    def to_dict(self) -> dict[str, t.Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """The findings for this process, and the scope it should use."""

    findings: tuple[Finding, ...]
    recommended_scope: str
    reason: str
    runtime: dict[str, t.Any]

    @property
    def hazards(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "hazard")

    @property
    def ok(self) -> bool:
        """True when no finding is a hazard."""
        return not self.hazards

    @property
    def exit_status(self) -> int:
        """1 when any hazard was found, else 0 (the CLI's exit status)."""
        return 0 if self.ok else 1

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for f in self.findings if f.severity == s) for s in SEVERITIES}

    def to_dict(self) -> dict[str, t.Any]:
        return {
            "ok": self.ok,
            "exit_status": self.exit_status,
            "counts": self.counts(),
            "recommended_scope": self.recommended_scope,
            "reason": self.reason,
            "runtime": dict(self.runtime),
            "findings": [f.to_dict() for f in self.findings],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def format_text(self, width: int = 100) -> str:
        """A plain-text report that fits one screen (no colours, no TTY needed)."""
        rt = self.runtime
        head = (
            f"scoping doctor: pid {rt['pid']}, Python {rt['python']}, "
            f"SQLAlchemy {rt['sqlalchemy'] or '-'}, greenlet {rt['greenlet'] or '-'}, "
            f"gevent {rt['gevent'] or '-'}"
        )
        lines = [head, ""]
        indent = " " * 9
        order = {s: i for i, s in enumerate(reversed(SEVERITIES))}
        for f in sorted(self.findings, key=lambda f: order[f.severity]):
            label = f.severity.upper().ljust(8)
            title = f"{f.subject}: {f.title}" if f.subject else f.title
            lines.extend(
                textwrap.wrap(title, width, initial_indent=label + " ", subsequent_indent=indent)
            )
            if f.detail and f.severity in ("hazard", "warning"):
                lines.extend(
                    textwrap.wrap(f.detail, width, initial_indent=indent, subsequent_indent=indent)
                )
            if f.fix and f.severity != "ok":
                lines.extend(
                    textwrap.wrap(
                        "fix: " + f.fix,
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent + "     ",
                    )
                )
        lines.append("")
        lines.extend(
            textwrap.wrap(
                f'Recommended scope: "{self.recommended_scope}" ({self.reason})',
                width,
                subsequent_indent="  ",
            )
        )
        c = self.counts()
        lines.append(
            f"Result: {c['hazard']} hazard(s), {c['warning']} warning(s), {c['info']} info, "
            f"{c['ok']} ok; exit status {self.exit_status}"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_text()


class UnsafeProcess(ScopingError):
    """Raised by ``check()`` when ``diagnose()`` finds at least one hazard."""

    def __init__(self, diagnosis: Diagnosis) -> None:
        self.diagnosis = diagnosis
        lines = [
            f"{len(diagnosis.hazards)} Session-scoping hazard(s) in this process "
            "(scoping.diagnose() gives the full report):"
        ]
        for f in diagnosis.hazards:
            name = f"{f.subject}: " if f.subject else ""
            lines.append(f"- {name}{f.title}; fix: {f.fix}")
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------
# What the process looks like


@dataclasses.dataclass
class _Runtime:
    gevent_installed: bool
    gevent_imported: bool
    monkey: t.Any  # gevent.monkey, only when the process imported it
    patched: tuple[str, ...]
    threading_patched: bool
    greenlet_version: str | None
    asyncio_running: bool

    @property
    def gevent_patched(self) -> bool:
        """Greenlets of the hub run concurrently inside one OS thread."""
        return bool(self.patched)


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _module_version(module: str, *dists: str) -> str | None:
    mod = sys.modules.get(module)
    v = getattr(mod, "__version__", None) if mod is not None else None
    if isinstance(v, str):
        return v.split(" ")[0]
    return _dist_version(*dists)


def _version_tuple(v: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in v.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _asyncio_running() -> bool:
    aio = sys.modules.get("asyncio")
    if aio is None:
        return False
    try:
        aio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _runtime() -> _Runtime:
    # find_spec on a top-level name looks at sys.path only: gevent is not imported.
    installed = "gevent" in sys.modules or importlib.util.find_spec("gevent") is not None
    monkey = sys.modules.get("gevent.monkey")
    patched: tuple[str, ...] = ()
    if monkey is not None:
        patched = tuple(m for m in _PATCHABLE if monkey.is_module_patched(m))
    return _Runtime(
        gevent_installed=installed,
        gevent_imported="gevent" in sys.modules,
        monkey=monkey,
        patched=patched,
        threading_patched=_units.threading_is_patched(),
        greenlet_version=_module_version("greenlet", "greenlet"),
        asyncio_running=_asyncio_running(),
    )


def _qualname(obj: t.Any) -> str:
    if not hasattr(obj, "__qualname__"):  # a callable instance: name its class
        obj = type(obj)
    mod = getattr(obj, "__module__", None) or "?"
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    return f"{mod}.{name}"


def _names_by_id(targets: dict[int, object]) -> dict[int, list[str]]:
    """Module globals (and attributes of module globals) that refer to targets."""
    found: dict[int, list[str]] = {}
    if not targets:
        return found
    for modname, mod in list(sys.modules.items()):
        try:
            items = list(vars(mod).items())
        except Exception:
            continue
        for key, value in items:
            if id(value) in targets and targets[id(value)] is value:
                found.setdefault(id(value), []).append(f"{modname}.{key}")
                continue
            if issubclass(type(value), (types.ModuleType, type, types.FunctionType)):
                continue
            try:
                attrs = list(vars(value).items())
            except Exception:  # no __dict__, or a proxy that refuses (werkzeug LocalProxy)
                continue
            for attr, inner in attrs:
                if id(inner) in targets and targets[id(inner)] is inner:
                    found.setdefault(id(inner), []).append(f"{modname}.{key}.{attr}")
    for names in found.values():
        # Prefer the module the app defines it in over re-exports and __main__.
        names.sort(key=lambda n: (n.startswith("__main__."), n.count("."), n))
    return found


def _first_name(names: dict[int, list[str]], obj: object) -> str | None:
    found = names.get(id(obj))
    return found[0] if found else None


def _live_objects() -> tuple[list[t.Any], list[t.Any], list[t.Any]]:
    """Live scoped_sessions, Engines and non-main greenlets, in one gc pass."""
    sa_scoped: type | None = None
    sa_engine: type | None = None
    gl_type: type | None = None
    orm = sys.modules.get("sqlalchemy.orm.scoping")
    if orm is not None:
        sa_scoped = orm.scoped_session
    eng = sys.modules.get("sqlalchemy.engine.base")
    if eng is not None:
        sa_engine = eng.Engine
    gl = sys.modules.get("greenlet")
    if gl is not None:
        gl_type = gl.greenlet
    scoped: list[t.Any] = []
    engines: list[t.Any] = []
    greenlets: list[t.Any] = []
    if sa_scoped is None and sa_engine is None and gl_type is None:
        return scoped, engines, greenlets
    for o in gc.get_objects():
        # type(o), never isinstance(): isinstance reads o.__class__, which a
        # proxy object (werkzeug LocalProxy) may resolve and fail on.
        tp = type(o)
        if sa_scoped is not None and issubclass(tp, sa_scoped):
            scoped.append(o)
        elif sa_engine is not None and issubclass(tp, sa_engine):
            engines.append(o)
        elif gl_type is not None and issubclass(tp, gl_type):
            greenlets.append(o)
    return scoped, engines, greenlets


# --------------------------------------------------------------------------
# The checks


def _threads_inherit_context() -> bool:
    """Python 3.14's -X thread_inherit_context (on by default in free-threaded builds)."""
    return bool(getattr(sys.flags, "thread_inherit_context", 0))


def _check_python(rt: _Runtime) -> list[Finding]:
    impl = platform.python_implementation()
    version = platform.python_version()
    gil = getattr(sys, "_is_gil_enabled", None)
    build = " free-threaded" if gil is not None and not gil() else ""
    if _threads_inherit_context():
        return [
            Finding(
                "warning",
                "python.thread_inherit_context",
                f"Python {version}{build}: new threads start with a copy of the caller's context",
                "A Session held in a ContextVar by the thread that starts others is seen by "
                "them too (sys.flags.thread_inherit_context).",
                'use scope="thread" (or "auto") for threads, not scope="contextvar"',
            )
        ]
    return [Finding("info", "python.version", f"Python {version} ({impl}{build})")]


def _check_gevent(rt: _Runtime) -> list[Finding]:
    if not rt.gevent_installed:
        return [
            Finding(
                "info",
                "gevent.absent",
                "gevent is not installed",
                "Greenlet-based servers (gunicorn -k gevent) are not in use.",
            )
        ]
    version = _module_version("gevent", "gevent")
    if not rt.gevent_imported:
        return [
            Finding(
                "ok",
                "gevent.not_imported",
                f"gevent {version} is installed but not imported",
                "This process runs plain threads; the doctor did not import gevent.",
            )
        ]
    if rt.monkey is None or not rt.patched:
        return [
            Finding(
                "info",
                "gevent.not_patched",
                f"gevent {version} is imported but not monkey-patched",
                "threading.local is per OS thread: greenlets spawned in one thread share it.",
                'if greenlets use the database, use scope="greenlet"',
            )
        ]
    out = [
        Finding(
            "info",
            "gevent.patched",
            f"gevent {version} has patched: {', '.join(rt.patched)}",
            "Greenlets of the hub run concurrently inside each OS thread.",
        )
    ]
    if not rt.threading_patched:
        out.append(
            Finding(
                "warning",
                "gevent.threading_unpatched",
                "gevent is patched but threading is not (patch_all(thread=False))",
                "threading.local and get_ident are per OS thread, so every greenlet shares "
                "what they key; SQLAlchemy's default scoped_session hands all greenlets one "
                "Session. SQLAlchemy's locks stay native too: two greenlets making an "
                "engine's first connections at once deadlock on its first-connect lock.",
                'use scoping.scoped_session(factory, scope="greenlet"), and connect each '
                "engine once (engine.connect().close()) before greenlets use it",
            )
        )
    return out


def _check_greenlet(rt: _Runtime) -> list[Finding]:
    v = rt.greenlet_version
    if v is None:
        return [Finding("info", "greenlet.absent", "greenlet is not installed")]
    if _version_tuple(v) < (0, 4, 17):
        return [
            Finding(
                "hazard" if rt.gevent_patched else "warning",
                "greenlet.no_contextvars",
                f"greenlet {v} shares one contextvars context between greenlets",
                "Before greenlet 0.4.17 a ContextVar set in one greenlet is seen by all.",
                "upgrade greenlet to >= 0.4.17 (scoping needs >= 3.0)",
            )
        ]
    return [
        Finding(
            "ok",
            "greenlet.contextvars",
            f"greenlet {v}: each greenlet has its own contextvars context",
            "A new greenlet starts with an empty context; gevent.spawn does not copy the "
            "spawner's.",
        )
    ]


def _check_psycopg2(rt: _Runtime) -> list[Finding]:
    if "psycopg2" not in sys.modules:
        return []
    ext = sys.modules.get("psycopg2.extensions")
    if ext is None:  # psycopg2 imports it itself; be defensive anyway
        return []
    cb = ext.get_wait_callback()
    if cb is None:
        if rt.gevent_patched:
            return [
                Finding(
                    "hazard",
                    "psycopg2.blocking",
                    "psycopg2 has no wait callback: every query blocks the gevent hub",
                    "While a query runs no other greenlet runs and gevent.Timeout cannot fire.",
                    _FIX_PSYCOPG2,
                )
            ]
        return [
            Finding(
                "ok", "psycopg2.blocking_no_gevent", "psycopg2 waits natively (fine without gevent)"
            )
        ]
    mod = getattr(cb, "__module__", "") or ""
    if mod == "scoping.green" or mod.startswith("scoping.green."):
        return [
            Finding(
                "ok",
                "psycopg2.scoping_green",
                "psycopg2 waits cooperatively (scoping.green)",
                "On timeout or kill the callback cancels the server-side statement.",
                subject=_qualname(cb),
            )
        ]
    if mod.startswith("psycogreen"):
        return [
            Finding(
                "warning",
                "psycopg2.psycogreen",
                "psycopg2 waits cooperatively with psycogreen's callback",
                "On gevent.Timeout or kill psycogreen's callback lets psycopg2 close the "
                "connection while the server keeps running the statement.",
                "call scoping.green.patch_psycopg2() instead of psycogreen's patch_psycopg()",
                subject=_qualname(cb),
            )
        ]
    return [
        Finding(
            "info",
            "psycopg2.custom_callback",
            f"psycopg2 wait callback {_qualname(cb)}",
            "Not one the doctor knows; make sure it yields to the hub and cancels the "
            "statement when interrupted.",
            _FIX_PSYCOPG2,
            subject=_qualname(cb),
        )
    ]


def _strategy_name(obj: t.Any) -> str:
    strategy = getattr(obj, "strategy", None)
    if strategy is None:
        return "?"
    name = getattr(strategy, "name", None)
    return name if isinstance(name, str) else type(strategy).__name__


def _check_scoped_session(obj: t.Any, name: str | None, rt: _Runtime) -> Finding:
    label = name or f"scoped_session at {id(obj):#x}"
    ours = sys.modules.get("scoping.session")
    # issubclass, not the class's module: a user's subclass of ours is ours too.
    if ours is not None and issubclass(type(obj), ours.scoped_session):
        strategy = _strategy_name(obj)
        try:
            live = f" It holds {len(obj.registry)} Session(s) now."
        except Exception:
            live = ""
        if strategy == "thread" and rt.gevent_patched and not rt.threading_patched:
            return Finding(
                "warning",
                "scoped_session.scoping_thread_unpatched",
                'scoping.scoped_session, scope "thread" with threading unpatched',
                "gevent is patched with thread=False, so the thread scope is the OS thread "
                "and its greenlets share one Session." + live,
                'use scope="greenlet" (or "auto")',
                subject=label,
            )
        return Finding(
            "ok",
            "scoped_session.scoping",
            f'scoping.scoped_session, scope "{strategy}"',
            "Sessions are released when their scope ends." + live,
            subject=label,
        )
    reg = getattr(obj, "registry", None)
    reg_type = type(reg).__name__
    if reg_type == "ThreadLocalRegistry":
        local = getattr(reg, "registry", None)
        native = type(local) is _units.native_local_class()
        if rt.gevent_patched and native:
            return Finding(
                "hazard",
                "scoped_session.shared",
                "SQLAlchemy scoped_session shared by every greenlet",
                "Its ThreadLocalRegistry holds a native threading.local built before "
                "gevent.monkey.patch_all(): all greenlets of a thread get the same Session, "
                "and two greenlets on one connection can hang the process.",
                _FIX_GREENLET_SCOPE,
                subject=label,
            )
        if rt.gevent_patched:
            return Finding(
                "ok",
                "scoped_session.gevent_local",
                "SQLAlchemy scoped_session, one Session per greenlet (gevent local)",
                subject=label,
            )
        return Finding(
            "ok",
            "scoped_session.thread_local",
            "SQLAlchemy scoped_session, one Session per thread",
            subject=label,
        )
    if reg_type == "ScopedRegistry":
        sf = getattr(reg, "scopefunc", None)
        sf_name = getattr(sf, "__name__", "") or ""
        held = getattr(reg, "registry", None)
        n = len(held) if isinstance(held, dict) else -1
        live = f" It holds {n} Session(s) now." if n >= 0 else ""
        if sf_name == "get_ident" and rt.gevent_patched:
            return Finding(
                "hazard",
                "scoped_session.get_ident",
                f"scoped_session keyed by {_qualname(sf)} under gevent",
                "A native get_ident is one key for every greenlet of a thread (one shared "
                "Session); gevent's is id(greenlet), and ids are reused, so a new greenlet "
                "inherits a dead greenlet's Session." + live,
                _FIX_GREENLET_SCOPE,
                subject=label,
            )
        if sf_name == "get_ident":
            return Finding(
                "warning",
                "scoped_session.get_ident_threads",
                f"scoped_session keyed by {_qualname(sf)}: never evicted",
                "ScopedRegistry keeps a Session per thread id until remove(); thread ids are "
                "reused, so a new thread can inherit a dead thread's Session." + live,
                'use scoping.scoped_session(factory, scope="thread")',
                subject=label,
            )
        if sf_name == "getcurrent":
            return Finding(
                "warning",
                "scoped_session.getcurrent",
                f"scoped_session keyed by {_qualname(sf)}: never evicted",
                "Every greenlet that forgets remove() stays alive with its Session and its "
                "pooled connection." + live,
                'use scoping.scoped_session(factory, scope="greenlet")',
                subject=label,
            )
        return Finding(
            "info",
            "scoped_session.custom_scopefunc",
            f"scoped_session keyed by {_qualname(sf)}",
            "ScopedRegistry never evicts: each scope's Session stays until remove()." + live,
            "make sure remove() runs at the end of every scope",
            subject=label,
        )
    return Finding(
        "info",
        "scoped_session.unknown_registry",
        f"scoped_session with registry {type(reg).__module__}.{reg_type}",
        subject=label,
    )


def _is_native_lock(lock: t.Any, rt: _Runtime) -> bool | None:
    """True for a lock of the OS thread, False for a gevent one, None if unknown."""
    tp = type(lock)
    # Measured on CPython 3.11 / gevent 26.9: built before patch_all() the
    # pool's mutex is a _thread.RLock and its overflow lock a _thread.lock;
    # after, a threading._RLock over a gevent lock and a gevent.thread.LockType.
    if tp.__module__ == "_thread" and tp.__name__ in ("lock", "RLock"):
        return True
    if tp.__module__.startswith("gevent"):
        return False
    if tp.__module__ == "threading" and tp.__name__ == "_RLock":
        # Python RLock: native or not depending on the lock it wraps.
        return _is_native_lock(getattr(lock, "_block", None), rt)
    return None


def _distinct_pools(engines: list[t.Any]) -> t.Iterator[tuple[t.Any, t.Any]]:
    """``(engine, pool)`` for each pool once, with the first engine that uses it."""
    seen: set[int] = set()
    for engine in engines:
        pool = getattr(engine, "pool", None)
        if pool is None or id(pool) in seen:
            continue
        seen.add(id(pool))
        yield engine, pool


def _check_engines(
    engines: list[t.Any], names: dict[int, list[str]], rt: _Runtime
) -> list[Finding]:
    if not rt.gevent_patched:
        return []
    out: list[Finding] = []
    for engine, pool in _distinct_pools(engines):
        label = _first_name(names, engine) or f"Engine {engine.url!r}"
        conn_local = getattr(pool, "_conn", None)
        if type(pool).__name__ == "SingletonThreadPool" and conn_local is not None:
            if type(conn_local) is _units.native_local_class():
                out.append(
                    Finding(
                        "hazard",
                        "engine.singleton_pool_shared",
                        "SingletonThreadPool built before patch_all(): one connection for every "
                        "greenlet",
                        "Its threading.local is native, so all greenlets of a thread share one "
                        "DBAPI connection (measured: 3 concurrent greenlets, 1 connection).",
                        "build the engine after gevent.monkey.patch_all()",
                        subject=label,
                    )
                )
            continue
        locks = [
            getattr(getattr(pool, "_pool", None), "mutex", None),
            getattr(pool, "_overflow_lock", None),
        ]
        verdicts = [_is_native_lock(lk, rt) for lk in locks if lk is not None]
        if not verdicts:
            continue
        if any(v is None for v in verdicts):
            out.append(
                Finding(
                    "info",
                    "engine.pool_locks_unknown",
                    f"{type(pool).__name__}: cannot tell whether its locks are gevent's",
                    subject=label,
                )
            )
        elif any(verdicts):
            out.append(
                Finding(
                    "info",
                    "engine.pool_native_locks",
                    f"{type(pool).__name__} locks were built before patch_all() (native)",
                    "Measured harmless: the pool holds them only for non-blocking steps, and a "
                    "checkout that waits allocates its waiter lock from the patched threading "
                    "module, so it still yields to the hub.",
                    "none needed; build engines after patch_all() to keep it tidy",
                    subject=label,
                )
            )
        else:
            out.append(
                Finding(
                    "ok",
                    "engine.pool_gevent_locks",
                    f"{type(pool).__name__} locks are gevent's",
                    subject=label,
                )
            )
    return out


def _process_started_at() -> float | None:
    """Wall-clock time (``time.time()``) at which this process began, or None.

    ``scoping.fork.forked_at()`` when scoping saw the fork; else, on Linux, the
    start time the kernel keeps in ``/proc/self/stat`` (clock ticks since boot,
    10 ms resolution, rounded down: a connection opened by this process is
    never taken for an inherited one, and one opened by the parent less than a
    tick before the fork can be missed).
    """
    fork = sys.modules.get("scoping.fork")
    if fork is not None:
        at = fork.forked_at()
        if at is not None:
            return float(at)
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime; fields[0] is field 3
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - since_boot


def _pooled_records(pool: t.Any) -> list[t.Any]:
    """The idle connection records of a QueuePool-like pool that hold a DBAPI connection."""
    queue = getattr(getattr(pool, "_pool", None), "queue", None)
    if queue is None:
        return []
    return [r for r in list(queue) if getattr(r, "dbapi_connection", None) is not None]


def _check_inherited(
    engines: list[t.Any], names: dict[int, list[str]], started_at: float | None
) -> list[Finding]:
    """Pools holding connections opened before this process was forked."""
    if started_at is None:
        return []
    out: list[Finding] = []
    for engine, pool in _distinct_pools(engines):
        records = _pooled_records(pool)
        inherited = [r for r in records if float(getattr(r, "starttime", 0.0)) < started_at]
        if not inherited:
            continue
        label = _first_name(names, engine) or f"Engine {engine.url!r}"
        out.append(
            Finding(
                "hazard",
                "engine.inherited_connections",
                f"{len(inherited)} pooled connection(s) were opened by another process",
                "The pool was connected before this process was forked (a warm-up query with "
                "gunicorn --preload, Celery prefork, multiprocessing): parent and child now send "
                "on the same socket, so requests fail ('no message from the libpq', SSL errors) "
                "or one process reads the other's results.",
                "call scoping.fork.dispose_engines(engine) in the child (post_fork, "
                "worker_process_init), or build the scoped_session with scoping.scoped_session, "
                "which does it for its engines; or connect only after the fork",
                subject=label,
            )
        )
    return out


def _recommend(rt: _Runtime, greenlets: list[t.Any]) -> tuple[str, str]:
    if rt.asyncio_running:
        return "contextvar", (
            "an asyncio event loop runs in this thread: one Session per task; "
            'scope="auto" does the same'
        )
    if rt.gevent_patched:
        return "greenlet", "gevent is monkey-patched: one Session per greenlet"
    busy = [
        g
        for g in greenlets
        if getattr(g, "parent", None) is not None
        and not getattr(g, "dead", True)
        and not (type(g).__module__ or "").startswith("sqlalchemy")
    ]
    if busy:
        return "greenlet", (
            f"{len(busy)} live greenlet(s) without gevent patching: one Session per greenlet"
        )
    return "thread", 'plain threads: one Session per thread; scope="auto" does the same'


def diagnose() -> Diagnosis:
    """Inspect this process and return its findings; imports and patches nothing.

    Safe before and after ``gevent.monkey.patch_all()``: gevent is looked at
    only when the process already imported ``gevent.monkey``.
    """
    rt = _runtime()
    findings: list[Finding] = []
    findings += _check_python(rt)
    findings += _check_gevent(rt)
    findings += _check_greenlet(rt)
    findings += _check_psycopg2(rt)
    scoped, engines, greenlets = _live_objects()
    targets = {id(o): o for o in scoped + engines}
    names = _names_by_id(targets)
    for obj in scoped:
        findings.append(_check_scoped_session(obj, _first_name(names, obj), rt))
    findings += _check_engines(engines, names, rt)
    findings += _check_inherited(engines, names, _process_started_at())
    if "sqlalchemy" in sys.modules and not scoped:
        findings.append(
            Finding("info", "scoped_session.none", "no live scoped_session in this process")
        )
    scope, reason = _recommend(rt, greenlets)
    del scoped, engines, greenlets, targets
    runtime = {
        "pid": os.getpid(),
        "python": platform.python_version(),
        "sqlalchemy": _module_version("sqlalchemy", "SQLAlchemy")
        if "sqlalchemy" in sys.modules
        else _dist_version("SQLAlchemy"),
        "greenlet": rt.greenlet_version,
        "gevent": _module_version("gevent", "gevent") if rt.gevent_installed else None,
        "gevent_imported": rt.gevent_imported,
        "gevent_patched": list(rt.patched),
        "psycopg2_imported": "psycopg2" in sys.modules,
        "asyncio_running": rt.asyncio_running,
    }
    return Diagnosis(tuple(findings), scope, reason, runtime)


def check() -> Diagnosis:
    """Fail fast: run ``diagnose()`` and raise ``UnsafeProcess`` on any hazard.

    Returns the diagnosis when there is none, so callers can log warnings.
    """
    diagnosis = diagnose()
    if diagnosis.hazards:
        raise UnsafeProcess(diagnosis)
    return diagnosis


# --------------------------------------------------------------------------
# The demo: ``python -m scoping doctor --demo``

# The planted app: everything here is the usual way to get it wrong.
# Indented source, dedented at use: no line of this module starts with an import
# of gevent or psycopg2 (the project's import-safety check greps for those).
DEMO_APP = textwrap.dedent('''\
    """An app module built wrong on purpose (imported before gevent patches)."""
    import psycopg2  # imported, but no wait callback: queries would block the hub
    import sqlalchemy as sa
    from sqlalchemy import orm

    # Never connects: the doctor needs no database.
    engine = sa.create_engine("postgresql+psycopg2://demo@127.0.0.1:1/demo")
    # Built before gevent.monkey.patch_all(): its threading.local is the native one.
    Session = orm.scoped_session(orm.sessionmaker(bind=engine))
    ''')

# The child: imports the app, then patches (as `gunicorn --preload -k gevent` does).
# A missing prerequisite is reported as such (exit 3), never as a missed hazard.
DEMO_MAIN = textwrap.dedent("""\
    import json
    import sys
    try:
        import demo_app  # noqa: F401  (builds Session before patching)
        from gevent import monkey
    except ImportError as exc:
        with open(sys.argv[1], "w") as fh:
            json.dump({"unavailable": exc.name or str(exc)}, fh)
        sys.exit(3)
    monkey.patch_all()

    import scoping.doctor
    diagnosis = scoping.doctor.diagnose()
    with open(sys.argv[1], "w") as fh:
        fh.write(diagnosis.to_json())
    print(diagnosis.format_text())
    try:
        scoping.doctor.check()
    except scoping.doctor.UnsafeProcess as exc:
        print()
        print("scoping.doctor.check() raised UnsafeProcess:")
        print(str(exc))
    sys.exit(diagnosis.exit_status)
    """)

#: (code, subject) of the hazards the demo plants; subject None matches any.
DEMO_EXPECTED: tuple[tuple[str, str | None], ...] = (
    ("scoped_session.shared", "demo_app.Session"),
    ("psycopg2.blocking", None),
)

#: What each module the demo needs is installed with.
_DEMO_INSTALL = {
    "gevent": "pip install gevent",
    "psycopg2": "pip install psycopg2-binary",
    "sqlalchemy": "pip install sqlalchemy",
}

#: ``run_demo()`` exit statuses: caught, missed, could not run.
DEMO_CAUGHT, DEMO_MISSED, DEMO_UNAVAILABLE = 0, 1, 2


def _demo_width() -> int:
    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 100))


def run_demo(as_json: bool = False, timeout: float = 120.0) -> int:
    """Run a process built wrong on purpose and check that the doctor catches it.

    The child imports an app module that builds SQLAlchemy's ``scoped_session``
    and imports psycopg2, then calls ``gevent.monkey.patch_all()``; no database
    is needed. Returns ``DEMO_CAUGHT`` (0) when the child's doctor exited 1 and
    reported every hazard in ``DEMO_EXPECTED``, ``DEMO_MISSED`` (1) when it did
    not, and ``DEMO_UNAVAILABLE`` (2) when the demo could not run because
    gevent, psycopg2 or SQLAlchemy is not installed (the message names the
    install command). Costs one child interpreter (about a second).
    """
    package_root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="scoping-demo-") as tmp:
        Path(tmp, "demo_app.py").write_text(DEMO_APP)
        report = Path(tmp, "diagnosis.json")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [tmp, str(package_root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env["COLUMNS"] = str(_demo_width())
        try:
            proc = subprocess.run(
                [sys.executable, "-c", DEMO_MAIN, str(report)],
                env=env,
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            print(f"demo: the child process did not finish within {timeout:.0f} s", file=sys.stderr)
            return DEMO_MISSED
        result: dict[str, t.Any] | None = None
        if report.exists() and report.stat().st_size:
            result = json.loads(report.read_text())
    if result is not None and "unavailable" in result:
        return _demo_unavailable(str(result["unavailable"]), as_json)
    diagnosis = result
    missing = _demo_missing(diagnosis)
    caught = diagnosis is not None and not missing and proc.returncode == 1
    if as_json:
        print(
            json.dumps(
                {
                    "demo": "SQLAlchemy scoped_session built before gevent.monkey.patch_all(); "
                    "psycopg2 imported without a wait callback",
                    "ran": True,
                    "expected": [{"code": c, "subject": s} for c, s in DEMO_EXPECTED],
                    "missing": [{"code": c, "subject": s} for c, s in missing],
                    "caught": caught,
                    "child_exit_status": proc.returncode,
                    "diagnosis": diagnosis,
                },
                indent=2,
            )
        )
    else:
        print(
            "Demo: a child process imports an app module that builds SQLAlchemy's "
            "scoped_session\nand imports psycopg2, then calls gevent.monkey.patch_all(). "
            "Its doctor says:\n"
        )
        print(proc.stdout.rstrip())
        print()
        if caught:
            print(
                "Demo passed: the doctor caught every planted hazard "
                f"({', '.join(c for c, _ in DEMO_EXPECTED)})."
            )
        else:
            names = ", ".join(c for c, _ in missing) or "(exit status)"
            print(f"Demo FAILED: child exit status {proc.returncode}, not caught: {names}")
    if not caught and proc.stderr.strip():
        print(proc.stderr.rstrip(), file=sys.stderr)
    return DEMO_CAUGHT if caught else DEMO_MISSED


def _demo_unavailable(module: str, as_json: bool) -> int:
    top = module.split(".")[0]
    fix = _DEMO_INSTALL.get(top, f"install {top}")
    message = (
        f"The demo could not run: {top} is not installed, and the planted process "
        f"needs gevent, psycopg2 and SQLAlchemy. Fix: {fix}. (Nothing was diagnosed; "
        "`python -m scoping doctor` without --demo needs none of them.)"
    )
    if as_json:
        print(
            json.dumps(
                {
                    "ran": False,
                    "caught": None,
                    "missing_module": top,
                    "fix": fix,
                    "message": message,
                },
                indent=2,
            )
        )
    else:
        print(message)
    return DEMO_UNAVAILABLE


def _demo_missing(diagnosis: dict[str, t.Any] | None) -> list[tuple[str, str | None]]:
    if diagnosis is None:
        return list(DEMO_EXPECTED)
    hazards = [
        (f["code"], f["subject"]) for f in diagnosis["findings"] if f["severity"] == "hazard"
    ]
    return [
        (code, subject)
        for code, subject in DEMO_EXPECTED
        if not any(c == code and (subject is None or s == subject) for c, s in hazards)
    ]
