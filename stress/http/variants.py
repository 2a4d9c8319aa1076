"""The variants of the app that ``python -m stress.http`` serves, and what each must show.

A variant is one object: how the app builds its Session (``orm`` and
``strategy``), which psycopg2 wait callback the workers install (``driver``),
whether gunicorn imports the app in the master (``preload``), and the hazards
that it is expected to reproduce (naive variants) or the driver hazards it is
allowed to show (scoping variants with a driver that does not cancel).
"""

from __future__ import annotations

import dataclasses
import typing as t

from scoping.scopes import STRATEGY_NAMES

#: Drivers: scoping.green's callback (cancels on interruption), psycogreen's, or none.
DRIVERS = ("green", "psycogreen", "none")

#: Anomalies that a correct Session scope never shows, whatever the driver.
SCOPING_ANOMALIES = (
    "lost",  # an acknowledged write is not in the table
    "committed_failed",  # a row from a raising, timed-out or killed request is committed
    "committed_on_error",  # a create answered with an error, yet committed
    "errors",  # unexpected responses (5xx, refused, wrong status)
    "idle_in_tx",  # backends idle in transaction after the run
    "worker_timeouts",  # gunicorn killed a stuck worker
    "log_errors",  # exceptions in the server log (other than the /fail route's own)
    "doctor",  # scoping.doctor hazards in post_worker_init (inherited connections...)
)
#: Hazards of the driver, not of the Session scope.
DRIVER_HAZARDS = (
    "lingering",  # statements still running on the server 1.5 s after a Timeout
    "timeout_ignored",  # gevent.Timeout could not fire: the query blocked the hub
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to build the app; ``expect`` lists the hazards it must reproduce."""

    orm: str  # "flask-sqlalchemy", "sqlalchemy" or "scoping"
    driver: str
    preload: bool
    strategy: str | None = None
    expect: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        base = self.strategy if self.orm == "scoping" else self.orm
        return f"{base}/{self.driver}" + ("/preload" if self.preload else "")

    @property
    def naive(self) -> bool:
        return self.orm != "scoping"

    @property
    def allowed(self) -> tuple[str, ...]:
        """Driver hazards a scoping variant may show (the driver's, not the scope's)."""
        if self.driver == "psycogreen":
            return ("lingering",)
        if self.driver == "none":
            return ("timeout_ignored",)
        return ()

    def config(self) -> dict[str, t.Any]:
        return {
            "orm": self.orm,
            "strategy": self.strategy,
            "driver": self.driver,
            "preload": self.preload,
        }


def _naive_expect(orm: str, driver: str, preload: bool) -> tuple[str, ...]:
    expect: list[str] = []
    if orm == "sqlalchemy" and preload:
        # Built before patch_all(): one Session for every greenlet of a worker,
        # on a pool that holds the master's warm-up connection. The workers
        # hang, so the Timeout probe cannot tell anything about the driver.
        return ("collapse",)
    if driver == "psycogreen":
        expect.append("lingering")
    if driver == "none":
        expect.append("timeout_ignored")
    return tuple(expect)


def all_variants() -> list[Variant]:
    """Every variant of the full run."""
    out: list[Variant] = []
    for orm in ("flask-sqlalchemy", "sqlalchemy"):
        for driver in ("psycogreen", "green"):
            for preload in (False, True):
                out.append(
                    Variant(orm, driver, preload, expect=_naive_expect(orm, driver, preload))
                )
    for strategy in STRATEGY_NAMES:
        for driver in ("green", "psycogreen"):
            for preload in (False, True):
                out.append(Variant("scoping", driver, preload, strategy))
    out.append(
        Variant("sqlalchemy", "none", False, expect=_naive_expect("sqlalchemy", "none", False))
    )
    out.append(Variant("scoping", "none", False, "greenlet"))
    return out


def quick_variants() -> list[Variant]:
    """The ``--quick`` set: every hazard once, every strategy once."""
    wanted = [
        ("flask-sqlalchemy", "psycogreen", False, None),
        ("sqlalchemy", "psycogreen", True, None),
        ("greenlet", "green", True, "greenlet"),
        ("auto", "green", True, "auto"),
        ("thread", "green", False, "thread"),
        ("contextvar", "green", False, "contextvar"),
        ("token", "green", False, "token"),
        ("greenlet", "psycogreen", False, "greenlet"),
    ]
    by_key = {(v.orm if v.naive else v.strategy, v.driver, v.preload): v for v in all_variants()}
    return [by_key[(orm, driver, preload)] for orm, driver, preload, _ in wanted]


def fault_variants() -> list[Variant]:
    """The ``--faults`` set: one naive variant per ORM and the recommended scoping setup."""
    keep = {
        "flask-sqlalchemy/psycogreen",
        "sqlalchemy/psycogreen",
        "greenlet/green",
        "greenlet/green/preload",
    }
    return [v for v in all_variants() if v.name in keep]


def select(names: t.Iterable[str]) -> list[Variant]:
    """Variants by name (``--variants a,b``); unknown names raise ValueError naming the choices."""
    by_name = {v.name: v for v in all_variants()}
    out = []
    for name in names:
        if name not in by_name:
            raise ValueError(f"unknown variant {name!r}; choose from: {', '.join(by_name)}")
        out.append(by_name[name])
    return out
