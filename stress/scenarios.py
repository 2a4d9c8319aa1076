"""The stress matrix: scenarios (documented hazards) x setups (a naive baseline and
the scoping strategies).

Each scenario names the runtime its cell subprocess builds (gevent patched fully,
``patch_all(thread=False)``, raw greenlets with no gevent at all), the naive
baseline that reproduces the hazard, the failure mix of its requests, and the
indicator that proves the baseline hit the hazard. Nothing here imports gevent.
"""

from __future__ import annotations

import dataclasses
import typing as t

STRATEGIES: tuple[str, ...] = ("thread", "greenlet", "contextvar", "token", "auto")
BASELINE = "baseline"
SETUPS: tuple[str, ...] = (BASELINE, *STRATEGIES)

# Indicators a baseline may show (keys of the cell metrics, see detectors.anomalies).
SHARED = ("hang", "errors", "stale", "leaks", "db_cross", "db_failed", "lost", "dup")


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    summary: str  # one line for --help
    runtime: str  # "gevent" | "gevent-nothread" | "raw-greenlet"
    baseline: str  # what the naive baseline is
    hazard: str  # what the baseline is expected to show
    targets: tuple[str, ...]  # metrics, any of which > 0 proves the hazard
    fail: float = 0.10  # share of requests that raise after their flush
    forget: float = 0.0  # share of requests that never call remove()
    timeout: float = 0.0  # share hit by gevent.Timeout mid-statement
    kill: float = 0.0  # share killed mid-statement
    forget_on_error: bool = False  # the app's error path skips remove()
    late_build: bool = False  # the registry and engine are built before patch_all()
    not_applicable: dict[str, str] = dataclasses.field(default_factory=dict)


_THREAD_NOT_PATCHED = (
    "not a fix here: threading is not patched, so 'thread' means one Session per OS "
    "thread, shared by every greenlet (use greenlet, contextvar, token or auto)"
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
            runtime="raw-greenlet",
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
        ),
    )
}

# Hazards SQLite cannot show, by scenario (None: every scenario).
SQLITE_LIMITS: dict[str | None, str] = {
    None: "SQLite: no server to ask, so statements left running after their request "
    "(pg_stat_activity) and commit attribution by transaction id (txid_current) are not "
    "measured; sqlite3 blocks the hub, so requests only interleave at explicit yields "
    "and never inside a statement, and the libpq deadlock cannot happen",
    "timeout-kill": "needs a statement that runs on a server while the client waits "
    "cooperatively (PostgreSQL pg_sleep); sqlite3 blocks the hub",
}


def not_applicable(scenario: Scenario, setup: str, *, sqlite: bool) -> str | None:
    """The reason ``setup`` does not apply to ``scenario``, or None if it does."""
    if sqlite and scenario.name in SQLITE_LIMITS:
        return SQLITE_LIMITS[scenario.name]
    return scenario.not_applicable.get(setup)


def parse_list(value: str | None, allowed: t.Sequence[str], what: str) -> list[str]:
    """Parse a comma-separated option; raise ValueError naming the allowed values."""
    if not value or value == "all":
        return list(allowed)
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise ValueError(f"unknown {what}: {', '.join(bad)} (choose from: {', '.join(allowed)})")
    return [v for v in allowed if v in items]
