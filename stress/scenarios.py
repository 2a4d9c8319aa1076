"""The stress matrix: scenarios (documented hazards) x setups (a naive baseline and
the scoping strategies).

A :class:`Scenario` is one object that carries everything about its hazard: the
runtime its cell subprocess builds (a key of :data:`stress.runtimes.RUNTIMES`),
the naive baseline registry that reproduces the hazard (:attr:`Scenario.naive`),
how its requests are served when that differs from the runtime's plain pool
(:attr:`Scenario.serve`, see :mod:`stress.drives`), the failure mix of its
requests, and its detector: the metrics any of which > 0 proves the baseline hit
the hazard (:attr:`Scenario.targets`). Nothing else in the harness branches on a
scenario's name. Nothing here imports gevent.
"""

from __future__ import annotations

import contextvars
import dataclasses
import typing as t

from . import drives

if t.TYPE_CHECKING:
    from sqlalchemy.orm import sessionmaker

    from .app import Setup
    from .runtimes import Cell, Runtime

from scoping.scopes import STRATEGY_NAMES

STRATEGIES: tuple[str, ...] = STRATEGY_NAMES  # the one list, kept by the library
BASELINE = "baseline"
SETUPS: tuple[str, ...] = (BASELINE, *STRATEGIES)

# Indicators a baseline may show (keys of the cell metrics, see detectors.anomalies).
SHARED = ("hang", "errors", "stale", "leaks", "db_cross", "db_failed", "lost", "dup")

TokenVar = contextvars.ContextVar[str]
Naive = t.Callable[["sessionmaker[t.Any]", TokenVar], "Setup"]
Serve = t.Callable[["Runtime", "Cell"], None]


def _sa(scopefunc: str | None = None, *, token_block: bool = False) -> Naive:
    """A naive baseline: SQLAlchemy's own ``scoped_session`` keyed by ``scopefunc``.

    ``scopefunc`` is resolved inside the cell, after the runtime is patched:
    ``"get_ident"`` (gevent's ``id(getcurrent())`` after ``patch_all()``),
    ``"getcurrent"`` (the greenlet object) or ``"token"`` (a ContextVar the app
    sets; with ``token_block`` the app sets it for each request's block).
    ``None`` is SQLAlchemy's default thread-local registry.
    """

    def build(factory: sessionmaker[t.Any], token_var: TokenVar) -> Setup:
        from sqlalchemy.orm import scoped_session

        from .app import SAScoped

        if scopefunc is None:
            return SAScoped(BASELINE, scoped_session(factory))
        if scopefunc == "get_ident":
            import threading

            return SAScoped(BASELINE, scoped_session(factory, scopefunc=threading.get_ident))
        if scopefunc == "getcurrent":
            import greenlet

            return SAScoped(BASELINE, scoped_session(factory, scopefunc=greenlet.getcurrent))
        proxy = scoped_session(factory, scopefunc=token_var.get)
        return SAScoped(BASELINE, proxy, token_var=token_var if token_block else None)

    return build


def _sa_async(scopefunc: str) -> Naive:
    """A naive asyncio baseline: SQLAlchemy's ``async_scoped_session`` keyed by
    ``asyncio.current_task`` (``"task"``) or by a request token in a ContextVar
    (``"token"``)."""

    def build(factory: t.Any, token_var: TokenVar) -> t.Any:
        import asyncio

        from sqlalchemy.ext.asyncio import async_scoped_session

        from .aioapp import AsyncSAScoped

        key = asyncio.current_task if scopefunc == "task" else token_var.get
        return AsyncSAScoped(BASELINE, async_scoped_session(factory, scopefunc=key))

    return build


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    summary: str  # one line for --help
    runtime: str  # a key of stress.runtimes.RUNTIMES
    baseline: str  # what the naive baseline is
    hazard: str  # what the baseline is expected to show
    targets: tuple[str, ...]  # the detector: metrics, any of which > 0 proves the hazard
    naive: Naive = dataclasses.field(default=_sa())  # builds the baseline's registry
    serve: Serve | None = None  # how requests are served (None: the runtime's pool)
    fail: float = 0.10  # share of requests that raise after their flush
    forget: float = 0.0  # share of requests that never call remove()
    timeout: float = 0.0  # share hit by gevent.Timeout mid-statement
    kill: float = 0.0  # share killed mid-statement
    forget_on_error: bool = False  # the app's error path skips remove()
    late_build: bool = False  # the registry and engine are built before patching
    postgres_only: str | None = None  # why SQLite cannot run it (None: it can)
    not_applicable: dict[str, str] = dataclasses.field(default_factory=dict)


_THREAD_NOT_PATCHED = (
    "not a fix here: threading is not patched, so 'thread' means one Session per OS "
    "thread, shared by every greenlet (use greenlet, contextvar, token or auto)"
)
_EXECUTOR_THREAD = (
    "not a fix here: executor threads outlive the calls they run, so a per-thread "
    "Session left by a failed call goes to the next call (use contextvar, token or auto)"
)
_ONE_THREAD = (
    "not a fix here: every task of an event loop runs in one thread and one greenlet "
    "(scoping.asyncio refuses them; use auto, contextvar or token)"
)
_ASYNC_NA = {"thread": _ONE_THREAD, "greenlet": _ONE_THREAD}
_ASYNCPG = "an AsyncSession on asyncpg needs PostgreSQL"
_COOPERATIVE = (
    "needs a statement that runs on a server while the client waits "
    "cooperatively (PostgreSQL pg_sleep); sqlite3 blocks the hub"
)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="late-patch",
            summary="SQLAlchemy's scoped_session built before gevent.monkey.patch_all(): "
            "every greenlet shares one Session",
            runtime="gevent",
            baseline="sqlalchemy.orm.scoped_session built before patch_all() (psycogreen)",
            hazard="one Session shared by all greenlets: stale state, leaks, errors or a hang",
            targets=SHARED,
            late_build=True,
        ),
        Scenario(
            name="thread-false",
            summary="patch_all(thread=False) keeps real threads: threading.local is "
            "per OS thread, so greenlets share one Session",
            runtime="gevent-nothread",
            baseline="sqlalchemy.orm.scoped_session under patch_all(thread=False) (psycogreen)",
            hazard="one Session shared by all greenlets: stale state, leaks, errors or a hang",
            targets=SHARED,
            not_applicable={"thread": _THREAD_NOT_PATCHED},
        ),
        Scenario(
            name="raw-greenlet",
            summary="cooperative greenlets with no gevent patching (a greenlet-based "
            "scheduler): threading.local is shared",
            runtime="greenloop",
            baseline="sqlalchemy.orm.scoped_session under a raw greenlet scheduler",
            hazard="one Session shared by all greenlets: stale state, leaks, errors or a hang",
            targets=SHARED,
            not_applicable={"thread": _THREAD_NOT_PATCHED},
        ),
        Scenario(
            name="ident-reuse",
            summary="registry keyed by threading.get_ident under gevent; error paths miss "
            "remove() and a later greenlet inherits the dead one's Session",
            runtime="gevent",
            baseline="scoped_session(scopefunc=threading.get_ident) after patch_all()",
            hazard="a new request inherits a dead request's Session and commits its rows",
            targets=("stale", "db_failed", "db_cross", "leaks"),
            naive=_sa("get_ident"),
            fail=0.20,
            forget_on_error=True,
        ),
        Scenario(
            name="no-remove",
            summary="registry keyed by the greenlet object, requests forget remove(): "
            "the registry grows and the pool runs dry",
            runtime="gevent",
            baseline="scoped_session(scopefunc=greenlet.getcurrent), remove() forgotten",
            hazard="dead greenlets keep their Session and connection: registry and "
            "checked-out connections grow until QueuePool limit errors",
            targets=("registry", "checkedout"),
            naive=_sa("getcurrent"),
            forget=0.25,
        ),
        Scenario(
            name="timeout-kill",
            summary="gevent.Timeout and kill() mid-statement: statements keep running on "
            "the server after their request ended",
            runtime="gevent",
            baseline="sqlalchemy.orm.scoped_session after patch_all(), psycogreen",
            hazard="interrupted statements keep running on the server (pg_stat_activity)",
            targets=("lingering",),
            timeout=0.06,
            kill=0.06,
            postgres_only=_COOPERATIVE,
        ),
        Scenario(
            name="copied-context",
            summary="contextvar-keyed registry; children start from a copied context "
            "(gr_context = copy_context()): parent and children share one Session",
            runtime="gevent",
            baseline="scoped_session(scopefunc=<contextvar token>.get), children spawned "
            "with gr_context = copy_context()",
            hazard="children inherit the parent's token and share its Session",
            targets=SHARED,
            naive=_sa("token"),
            serve=drives.copied_context,
        ),
        Scenario(
            name="fork",
            summary="a forked worker uses the registry while the parent's threads have "
            "open transactions (gunicorn --preload, multiprocessing)",
            runtime="threads",
            baseline="sqlalchemy.orm.scoped_session; the forked child uses the inherited "
            "engine without engine.dispose(close=False)",
            hazard="the child talks on the parent's sockets: the parent's commits lose rows, "
            "fail or hang",
            targets=("hang", "errors", "lost", "dup", "db_cross", "db_failed", "stale", "leaks"),
            serve=drives.fork,
            postgres_only="a forked child sharing the parent's connections needs a server "
            "connection (sqlite3 files are opened per process)",
        ),
        Scenario(
            name="to-thread",
            summary="asyncio handlers run the sync Session through asyncio.to_thread; "
            "error paths miss remove()",
            runtime="asyncio",
            baseline="sqlalchemy.orm.scoped_session (thread-local) used inside asyncio.to_thread",
            hazard="every task the executor thread serves shares one Session: a failed "
            "request's rows are committed by the next one",
            targets=("stale", "leaks", "db_failed", "db_cross"),
            fail=0.20,
            forget_on_error=True,
            postgres_only="executor threads write at once; SQLite takes one writer at a time",
            not_applicable={"thread": _EXECUTOR_THREAD, "greenlet": _EXECUTOR_THREAD},
        ),
        Scenario(
            name="orphan-task",
            summary="a child greenlet started with a copy of its request's context runs "
            "after the request's token block has exited",
            runtime="gevent",
            baseline="scoped_session(scopefunc=<contextvar token>.get), the token set per "
            "block; children spawned with gr_context = copy_context()",
            hazard="the orphan's pending work lands in the next block with that token, or "
            "its Session stays in the registry",
            targets=("registry", "checkedout", "stale", "leaks", "dup", "db_cross"),
            naive=_sa("token", token_block=True),
            serve=drives.orphans,
        ),
        Scenario(
            name="gather-shared",
            summary="asyncio handlers fan out with gather(); the tasks inherit a "
            "request token, so they share one AsyncSession",
            runtime="asyncio-session",
            baseline="sqlalchemy async_scoped_session(scopefunc=<contextvar token>.get), "
            "tasks gathered with return_exceptions=True",
            hazard="concurrent use of one AsyncSession: errors ('provisioning a new "
            "connection'), rows lost or committed by another task",
            targets=SHARED,
            naive=_sa_async("token"),
            serve=drives.gathered,
            postgres_only=_ASYNCPG,
            not_applicable=_ASYNC_NA,
        ),
        Scenario(
            name="task-no-remove",
            summary="async_scoped_session(scopefunc=current_task), one task per request, "
            "remove() forgotten: Sessions and connections pile up",
            runtime="asyncio-session",
            baseline="sqlalchemy async_scoped_session(scopefunc=asyncio.current_task), "
            "remove() forgotten",
            hazard="ended tasks keep their AsyncSession and its connection",
            targets=("registry", "checkedout"),
            naive=_sa_async("task"),
            forget=0.25,
            postgres_only=_ASYNCPG,
            not_applicable=_ASYNC_NA,
        ),
        Scenario(
            name="cancel-mid-query",
            summary="tasks cancelled in the middle of a statement; the app removes its "
            "Session on the success path only",
            runtime="asyncio-session",
            baseline="sqlalchemy async_scoped_session(scopefunc=asyncio.current_task), "
            "remove() skipped when cancelled",
            hazard="a cancelled task's Session and connection are never given back",
            targets=("registry", "checkedout", "lingering"),
            naive=_sa_async("task"),
            kill=0.10,
            forget_on_error=True,
            postgres_only=_ASYNCPG,
            not_applicable=_ASYNC_NA,
        ),
        Scenario(
            name="threadpool-hop",
            summary="sync endpoints in the loop's thread pool (Starlette/FastAPI); async "
            "middleware calls remove() from the loop thread",
            runtime="asyncio",
            baseline="sqlalchemy.orm.scoped_session (thread-local), remove() by the "
            "middleware after run_in_executor",
            hazard="remove() misses the pool thread's Session: the next request on that "
            "thread inherits it and commits a failed request's rows",
            targets=("stale", "leaks", "db_failed", "db_cross"),
            serve=drives.threadpool_hop,
            fail=0.20,
            postgres_only="pool threads write at once; SQLite takes one writer at a time",
            not_applicable={"thread": _EXECUTOR_THREAD, "greenlet": _EXECUTOR_THREAD},
        ),
    )
}

# Hazards SQLite cannot show, for every scenario.
SQLITE_NOTE = (
    "SQLite: no server to ask, so statements left running after their request "
    "(pg_stat_activity) and commit attribution by transaction id (txid_current) are not "
    "measured; sqlite3 blocks the hub, so requests only interleave at explicit yields "
    "and never inside a statement, and the libpq deadlock cannot happen"
)


def not_applicable(scenario: Scenario, setup: str, *, sqlite: bool) -> str | None:
    """The reason ``setup`` does not apply to ``scenario``, or None if it does."""
    if sqlite and scenario.postgres_only:
        return scenario.postgres_only
    return scenario.not_applicable.get(setup)


def parse_list(value: str | None, allowed: t.Sequence[str], what: str) -> list[str]:
    """Parse a comma-separated option; raise ValueError naming the allowed values.

    ``all`` (or nothing) selects every allowed value; a list that names nothing
    (``--scenarios ,``) is refused.
    """
    if value is None or value.strip() == "all":
        return list(allowed)
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError(f"no {what} given: name one or more of {', '.join(allowed)}, or all")
    bad = [v for v in items if v not in allowed]
    if bad:
        raise ValueError(f"unknown {what}: {', '.join(bad)} (choose from: {', '.join(allowed)})")
    return [v for v in allowed if v in items]
