"""Run the scenario x setup matrix: one table and one subprocess per cell.

The parent never patches anything. Per cell it creates the table, runs the
cell with :func:`stress.runner.run_cell`, ends whatever the cell left on the
server (statements still running, backends of a killed cell), audits the rows
against the request records, drops the table and judges the cell.
"""

from __future__ import annotations

import dataclasses
import secrets
import typing as t

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from . import app as appmod
from .detectors import DbAudit, audit_rows, judge, summarize
from .runner import run_cell
from .runtimes import RUNTIMES
from .scenarios import BASELINE, SCENARIOS, Scenario, not_applicable


@dataclasses.dataclass
class Options:
    scenarios: list[str]
    setups: list[str]
    requests: int = 400
    duration: float | None = None
    concurrency: int = 20
    rows: int = 3
    seed: int = 1
    stall: float = 10.0
    deadline: float = 120.0
    pool_timeout: float = 0.5
    long_seconds: float = 1.0
    timeout_after: float = 0.03
    kill_after: float = 0.03
    quick: bool = False
    mix: dict[str, float] | None = None  # overrides every scenario's mix

    def to_json(self) -> dict[str, t.Any]:
        return dataclasses.asdict(self)


def cell_mix(scenario: Scenario, opts: Options) -> dict[str, float]:
    mix = {
        "fail": scenario.fail,
        "forget": scenario.forget,
        "timeout": scenario.timeout,
        "kill": scenario.kill,
    }
    if opts.mix:
        mix.update({k: v for k, v in opts.mix.items() if v is not None})
    for kind in ("timeout", "kill"):
        if kind not in RUNTIMES[scenario.runtime].interrupts:
            mix[kind] = 0.0  # the runtime has no way to deliver it
    return mix


class Target:
    """The database cells run against, seen from the parent process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url, poolclass=NullPool)
        self.dialect = self.engine.dialect.name

    def create(self, table: str) -> None:
        with self.engine.begin() as conn:
            for ddl in appmod.create_table_sql(table, self.dialect):
                conn.execute(text(ddl))

    def end_leftovers(self, tag: str) -> int:
        """Terminate the cell's backends (statements still running, a killed cell's)."""
        if self.dialect != "postgresql":
            return 0
        with self.engine.begin() as conn:
            n = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name LIKE :tag AND pid <> pg_backend_pid()"
                ),
                {"tag": tag + "%"},
            ).scalar_one()
        return int(n)

    def groups(self, table: str) -> list[tuple[str, int | None, int]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(f"SELECT request_id, xact, count(*) FROM {table} GROUP BY request_id, xact")
            ).all()
        return [(r[0], None if r[1] is None else int(r[1]), int(r[2])) for r in rows]

    def drop(self, table: str) -> None:
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SET LOCAL lock_timeout = '10s'"))
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))

    def dispose(self) -> None:
        self.engine.dispose()


def cells(opts: Options) -> list[tuple[Scenario, str]]:
    return [(SCENARIOS[s], setup) for s in opts.scenarios for setup in opts.setups]


def run_one(
    target: Target,
    scenario: Scenario,
    setup: str,
    opts: Options,
    *,
    cell_id: str,
) -> dict[str, t.Any]:
    """Run and judge one cell; return its JSON-ready result.

    ``cell_id`` (``<run id>_<index>``) names the cell's table and its
    ``application_name``.
    """
    kind = "baseline" if setup == BASELINE else "strategy"
    cell: dict[str, t.Any] = {
        "scenario": scenario.name,
        "setup": setup,
        "kind": kind,
        "description": scenario.baseline if kind == "baseline" else f"scoping scope={setup!r}",
        "hazard": scenario.hazard,
        "targets": list(scenario.targets),
    }
    reason = not_applicable(scenario, setup, sqlite=target.dialect == "sqlite")
    if reason:
        cell.update(status="n/a", ok=None, reason=reason, metrics={})
        return cell
    table = f"stress_rows_{cell_id}"
    tag = f"stress-{cell_id}"
    mix = cell_mix(scenario, opts)
    config = {
        "url": target.url,
        "dialect": target.dialect,
        "table": table,
        "tag": tag,
        "scenario": scenario.name,
        "setup": setup,
        "runtime": scenario.runtime,
        "late_build": scenario.late_build,
        "stall": opts.stall,
        "requests": opts.requests,
        "duration": opts.duration,
        "concurrency": opts.concurrency,
        "rows": opts.rows,
        "seed": opts.seed,
        "mix": mix,
        "pool_size": opts.concurrency + opts.concurrency // 5 + 2,
        "pool_timeout": opts.pool_timeout,
        "long_seconds": opts.long_seconds,
        "timeout_after": opts.timeout_after,
        "kill_after": opts.kill_after,
    }
    target.create(table)
    try:
        run = run_cell(config, stall=opts.stall, deadline=opts.deadline)
        target.end_leftovers(tag)
        records = {rec.rid: rec for rec in run.records}
        audit: DbAudit | None = audit_rows(target.groups(table), records)
    finally:
        try:
            target.drop(table)
        except Exception:
            pass
    metrics = summarize(run.records, run.probe, audit, hang=run.hang)
    if audit is not None and not audit.attribution:
        metrics["db_cross"] = None
    crashed = not run.hang and run.probe is None
    metrics["crash"] = 1 if crashed else 0
    ok, why = judge(kind, scenario.targets, metrics)
    refused = server_refused(metrics)
    if refused:
        # Not a scoping result: the pool cannot exceed its size (max_overflow=0),
        # so the server ran out of connections for others' sake.
        ok, status = False, "SERVER"
        why = (
            f"the server refused {refused} connections (too many clients): not a scoping "
            "result; rerun with a lower --concurrency or when the server is quieter"
        )
    elif run.hang:
        status = "HANG"
    elif crashed:
        status = "CRASH"
    elif kind == "baseline":
        status = "hazard" if ok else "MISSED"
    else:
        status = "clean" if ok else "ANOMALY"
    cell.update(
        status=status,
        ok=ok,
        reason=why,
        metrics=metrics,
        mix=mix,
        driver=run.driver,
        wall_s=round(run.wall, 2),
        table=table,
        application_name=tag,
    )
    if run.notes:
        cell["notes"] = run.notes
    if run.hang:
        cell["hang_reason"] = run.hang_reason
        cell["stack"] = run.stack
    if crashed or (run.returncode not in (0, None) and not run.hang):
        cell["stderr_tail"] = run.stderr_tail
        cell["returncode"] = run.returncode
    return cell


def server_refused(metrics: t.Mapping[str, t.Any]) -> int:
    """Requests that failed because the server had no connection slot left."""
    samples = metrics.get("error_samples") or {}
    if "too many clients" not in str(samples.get("OperationalError", "")):
        return 0
    return int((metrics.get("errors_by_class") or {}).get("OperationalError", 0))


def new_run_id() -> str:
    return secrets.token_hex(3)
