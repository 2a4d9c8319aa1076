"""One variant end to end: serve it, load it with Locust, probe it, audit it."""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import glob
import json
import os
import subprocess
import sys
import threading
import time
import typing as t
import urllib.error
import urllib.request

from stress.http.gunicorn import ROOT, Gunicorn, read_log
from stress.http.variants import DRIVER_HAZARDS, SCOPING_ANOMALIES, Variant

if t.TYPE_CHECKING:
    from collections.abc import Callable

LOCUSTFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "locustfile.py")
#: Same constants as stress.http.app (not imported: importing the app needs its config).
APPLICATION_NAME = "stress-http-app"
MARKER = "stress-http-long"
PROBE_REQUESTS = 6
PROBE_SECONDS = 3.0
PROBE_CHECK_AFTER = 1.5


@dataclasses.dataclass
class Settings:
    users: int = 100
    duration: float = 10.0
    workers: int = 2
    weights: str = ""
    faults: bool = False


@dataclasses.dataclass
class Fault:
    at: float  # seconds after the load started
    kind: str  # "terminate" or "restart"
    done_at: float = 0.0  # time.time() when it was applied
    detail: str = ""


def _connect(dsn: str) -> t.Any:
    import psycopg2

    conn = psycopg2.connect(dsn, connect_timeout=10, application_name="stress-http-audit")
    conn.autocommit = True
    return conn


def _query(dsn: str, sql: str, args: tuple[t.Any, ...] = ()) -> list[tuple[t.Any, ...]]:
    conn = _connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


def create_table(dsn: str, table: str) -> None:
    _query(dsn, f'CREATE TABLE "{table}" (id varchar(64) PRIMARY KEY, kind varchar(16) NOT NULL)')


def backends(dsn: str, dbname: str) -> dict[str, int]:
    """The app's backends now: idle in transaction, active, active on a long statement."""
    rows = _query(
        dsn,
        "SELECT state, query LIKE %s FROM pg_stat_activity "
        "WHERE datname = %s AND application_name = %s",
        (f"%{MARKER}%", dbname, APPLICATION_NAME),
    )
    return {
        "idle_in_tx": sum(1 for state, _ in rows if state and state.startswith("idle in trans")),
        "active": sum(1 for state, long in rows if state == "active" and not long),
        "active_long": sum(1 for state, long in rows if state == "active" and long),
        "total": len(rows),
    }


def stuck_transactions(dsn: str, dbname: str, apart: float = 1.5) -> int:
    """Transactions idle in transaction in two snapshots ``apart`` seconds apart.

    One snapshot also catches a request that is between two statements (a
    worker whose hub another query blocks, under no wait callback); the same
    backend and transaction start in both snapshots is a transaction nobody
    will finish.
    """
    sql = ("SELECT pid, xact_start FROM pg_stat_activity WHERE datname = %s AND "
           "application_name = %s AND state LIKE 'idle in transaction%%'")  # fmt: skip
    first = set(_query(dsn, sql, (dbname, APPLICATION_NAME)))
    time.sleep(apart)
    return len(first & set(_query(dsn, sql, (dbname, APPLICATION_NAME))))


def terminate_app_backends(dsn: str, dbname: str) -> int:
    rows = _query(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND application_name = %s",
        (dbname, APPLICATION_NAME),
    )
    return sum(1 for (ok,) in rows if ok)


def _post(url: str, timeout: float = 10.0) -> int:
    request = urllib.request.Request(url, method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def probe_timeouts(base: str, dsn: str, dbname: str, driver: str) -> dict[str, t.Any]:
    """Time out PROBE_REQUESTS long queries at once; count those still running 1.5 s later."""
    seconds = PROBE_SECONDS if driver != "none" else 0.3
    ids = [f"probe-{i}-{os.getpid()}-{time.monotonic_ns()}" for i in range(PROBE_REQUESTS)]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(PROBE_REQUESTS) as pool:
        statuses = list(pool.map(lambda rid: _post(f"{base}/timeout/{rid}?s={seconds}"), ids))
    time.sleep(max(0.0, started + PROBE_CHECK_AFTER - time.monotonic()))
    still = backends(dsn, dbname)["active_long"]
    return {
        "ids": ids,
        "statuses": statuses,
        "lingering": still,
        "timeout_ignored": sum(1 for s in statuses if s == 200),
    }


def run_locust(
    base: str, workdir: str, settings: Settings, on_tick: Callable[[float], None] | None = None
) -> dict[str, t.Any]:
    prefix = os.path.join(workdir, "locust")
    env = {k: v for k, v in os.environ.items() if k not in ("SCOPING_DSN", "PGPASSWORD")}
    env["STRESS_HTTP_JOURNAL"] = os.path.join(workdir, "journal")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    if settings.weights:
        env["STRESS_HTTP_WEIGHTS"] = settings.weights
    args = [sys.executable, "-m", "locust", "-f", LOCUSTFILE, "--headless",
            "-u", str(settings.users), "-r", str(settings.users),
            "-t", f"{round(settings.duration)}s", "--host", base, "--csv", prefix,
            "--only-summary", "--stop-timeout", "0", "--exit-code-on-error", "0",
            "--loglevel", "ERROR", "--skip-log-setup"]  # fmt: skip
    started = time.time()
    with open(os.path.join(workdir, "locust.log"), "ab") as log:
        proc = subprocess.Popen(
            args,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + settings.duration + 60
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError("locust did not finish in time")
            if on_tick is not None:
                on_tick(time.time() - started)
            time.sleep(0.2)
    if proc.returncode != 0:
        with open(os.path.join(workdir, "locust.log"), encoding="utf-8", errors="replace") as fh:
            tail = " | ".join(fh.read().strip().splitlines()[-6:])
        raise RuntimeError(f"locust exited with {proc.returncode}: {tail}")
    stats = _locust_stats(prefix + "_stats.csv")
    journal: list[list[t.Any]] = []
    for path in sorted(glob.glob(os.path.join(workdir, "journal.*.jsonl"))):
        with open(path, encoding="utf-8") as fh:
            journal.extend(json.loads(line) for line in fh if line.strip())
    return {"started": started, "stats": stats, "journal": journal}


def _locust_stats(path: str) -> dict[str, float]:
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    total = next(r for r in rows if r["Name"] == "Aggregated")

    def num(key: str) -> float:
        value = total.get(key) or "0"
        return float(value) if value not in ("N/A", "") else 0.0

    return {
        "requests": num("Request Count"),
        "failures": num("Failure Count"),
        "rps": num("Requests/s"),
        "p50_ms": num("50%"),
        "p99_ms": num("99%"),
    }


EXPECTED = {"create": 201, "read": 200, "slow": 200, "fail": 500, "timeout": 504, "kill": 200}


def audit(journal: list[list[t.Any]], rows: dict[str, str], *, faults: bool) -> dict[str, t.Any]:
    """Check the table against what every client was told."""
    acked = {rid for _, op, rid, status, *_ in journal if op == "create" and status == 201}
    failing = {rid for _, op, rid, *_ in journal if op in ("fail", "timeout", "kill")}
    # An HTTP error answer, and no answer at all (None: cut at the end of the load;
    # 0: refused, reset or timed out client-side): both are unacknowledged writes.
    create_error = {
        rid for _, op, rid, status, *_ in journal if op == "create" and status and status != 201
    }
    unanswered = {rid for _, op, rid, status, *_ in journal if op == "create" and not status}
    errors = [(op, status) for _, op, _, status, *_ in journal if _unexpected(op, status)]
    by_status: dict[str, int] = {}
    for op, status in errors:
        key = f"{op} {status}"
        by_status[key] = by_status.get(key, 0) + 1
    should_not_be_there = failing | {rid for rid, kind in rows.items() if kind != "create"}
    result = {
        "writes_acked": len(acked),
        "lost": len(acked - rows.keys()),
        "duplicated": 0,  # the primary key makes a second copy impossible; counted for the record
        "committed_failed": len(should_not_be_there & rows.keys()),
        "committed_on_error": 0 if faults else len(create_error & rows.keys()),
        "unacked": len(unanswered) + len(create_error),
        "unacked_committed": len((unanswered | create_error) & rows.keys()),
        "no_answer": sum(1 for e in journal if e[3] == 0),
        "errors": len(errors),
        "errors_by_kind": dict(sorted(by_status.items(), key=lambda kv: -kv[1])[:8]),
        "timeouts_not_fired": sum(
            1 for _, op, _, status, *_ in journal if op == "timeout" and status == 200
        ),
        "requests_journaled": len(journal),
    }
    # A row could be committed twice only under two ids; rows we never asked for:
    asked = {rid for _, _, rid, *_ in journal}
    result["phantom_rows"] = len(rows.keys() - asked)
    return result


def _unexpected(op: str, status: int | None) -> bool:
    """An HTTP answer other than the route's (a 200 from /timeout is counted apart)."""
    return bool(status) and status != EXPECTED[op] and not (op == "timeout" and status == 200)


def error_window(journal: list[list[t.Any]], faults: list[Fault], end: float) -> dict[str, t.Any]:
    """Per fault: seconds from the fault to the last failed answer before the next fault.

    Answers are placed by the time they arrived. ``recovered``: a write started
    after that last failure was acknowledged before the next fault (or the end).
    """
    windows = []
    applied = [f for f in faults if f.done_at]
    for i, fault in enumerate(applied):
        stop = applied[i + 1].done_at if i + 1 < len(applied) else end
        bad = [
            e[4]
            for e in journal
            if e[4] is not None and fault.done_at <= e[4] < stop and _unexpected(e[1], e[3])
        ]
        last_bad = max(bad) if bad else fault.done_at
        good_after = [e for e in journal
                      if e[0] >= last_bad and e[4] is not None and e[4] < stop
                      and e[1] == "create" and e[3] == 201]  # fmt: skip
        windows.append({
            "kind": fault.kind, "at": round(fault.at, 1), "detail": fault.detail,
            "errors": len(bad), "window_s": round(last_bad - fault.done_at, 2),
            "recovered": bool(good_after),
        })  # fmt: skip
    return {
        "faults": windows,
        "recovered": all(w["recovered"] for w in windows) if windows else True,
        "max_window_s": max((w["window_s"] for w in windows), default=0.0),
    }


def hazards_of(variant: Variant, result: dict[str, t.Any]) -> tuple[list[str], list[str]]:
    """(scoping anomalies seen, driver hazards seen) for one variant's result."""
    a = result["audit"]
    values = {
        "lost": a["lost"],
        "committed_failed": a["committed_failed"],
        "committed_on_error": a["committed_on_error"],
        "errors": 0 if result["faults"] else a["errors"],
        "idle_in_tx": result["after"]["idle_in_tx"],
        "worker_timeouts": result["gunicorn"]["worker_timeouts"],
        "worker_restarts": result["gunicorn"]["worker_restarts"],
        # Terminated backends and a restart log errors on purpose.
        "log_errors": 0 if result["faults"] else sum(result["gunicorn"]["exceptions"].values()),
        # psycopg2.blocking (no wait callback) is the driver's hazard, counted as
        # timeout_ignored; every other doctor hazard is the Session setup's.
        "doctor": sum(
            1 for code in result["gunicorn"]["doctor_hazards"] if not code.startswith("psycopg2.")
        ),
        "lingering": result["probe"]["lingering"],
        # The probe only: under the load a /timeout answered 200 also happens when the
        # process got no CPU for the whole query (the Timeout fires in the hub, which
        # never ran); with no wait callback every probe answers 200.
        "timeout_ignored": result["probe"]["timeout_ignored"],
    }
    if result["faults"] and not result["recovery"]["recovered"]:
        values["errors"] = max(1, a["errors"])
    anomalies = [k for k in SCOPING_ANOMALIES if values[k]]
    driver = [k for k in DRIVER_HAZARDS if values[k]]
    return anomalies, driver


def verdict(variant: Variant, anomalies: list[str], driver: list[str]) -> tuple[bool, str]:
    """(passes, short reason). Naive: must reproduce ``expect``; scoping: no anomaly."""
    seen = set(anomalies) | set(driver)
    if anomalies:
        seen.add("collapse")
    if variant.naive:
        missing = [h for h in variant.expect if h not in seen]
        if missing:
            return False, "MISSED " + ",".join(missing)
        return True, "REPRODUCED" if variant.expect else "observed"
    extra = anomalies + [d for d in driver if d not in variant.allowed]
    if extra:
        return False, "ANOMALY " + ",".join(extra)
    return True, "OK"


@dataclasses.dataclass
class Context:
    """Where and how variants run: the database, a 0700 work directory, the settings."""

    database: t.Any  # stress.postgres.Database
    workdir: str
    settings: Settings
    restart: Callable[[], str] | None = None
    on_tick: Callable[[str, float], None] | None = None

    def tick(self, phase: str, seconds: float) -> None:
        if self.on_tick is not None:
            self.on_tick(phase, seconds)


def _schedule(settings: Settings, can_restart: bool) -> list[Fault]:
    if not settings.faults:
        return []
    d = settings.duration
    faults = [Fault(d * 0.15, "terminate"), Fault(d * 0.4, "terminate")]
    if can_restart:
        faults.append(Fault(d * 0.65, "restart"))
    return faults


def _load(server: Gunicorn, ctx: Context, faults: list[Fault]) -> dict[str, t.Any]:
    """Locust against the server, with the fault schedule applied beside it."""
    stop = threading.Event()
    thread = threading.Thread(
        target=_apply_faults,
        args=(faults, ctx.database.dsn, ctx.database.name, ctx.restart, stop),
        daemon=True,
    )
    if faults:
        thread.start()
    try:
        return run_locust(server.url, ctx.workdir, ctx.settings, lambda s: ctx.tick("load", s))
    finally:
        stop.set()
        if faults:
            thread.join(timeout=60)


def _measure(
    server: Gunicorn, variant: Variant, table: str, ctx: Context, faults: list[Fault]
) -> dict[str, t.Any]:
    dsn, dbname = ctx.database.dsn, ctx.database.name
    load = _load(server, ctx, faults)
    load_ended = time.time()
    ctx.tick("audit", ctx.settings.duration)
    time.sleep(1.0)  # let answered requests finish their teardown
    after = backends(dsn, dbname)
    after["idle_in_tx"] = stuck_transactions(dsn, dbname)
    t0 = time.monotonic()
    probe = probe_timeouts(server.url, dsn, dbname, variant.driver)
    probe_s = round(time.monotonic() - t0, 1)
    rows = dict(t.cast("list[tuple[str, str]]", _query(dsn, f'SELECT id, kind FROM "{table}"')))
    probe_ids = set(probe.pop("ids"))
    result = {
        "probe_s": probe_s,
        "probe_committed": len(probe_ids & rows.keys()),
        "stats": load["stats"],
        "audit": audit(
            load["journal"],
            {k: v for k, v in rows.items() if k not in probe_ids},
            faults=bool(faults),
        ),
        "after": after,
        "probe": probe,
        "recovery": error_window(load["journal"], faults, load_ended) if faults else None,
    }
    result["audit"]["committed_failed"] += result["probe_committed"]
    return result


def run_variant(variant: Variant, index: int, ctx: Context) -> dict[str, t.Any]:
    """Serve, load, probe and audit one variant; returns its JSON-ready result."""
    table = f"items_{index}"
    create_table(ctx.database.dsn, table)
    config = {"url": ctx.database.url, "table": table, "long_seconds": 0.5, **variant.config()}
    server = Gunicorn(ctx.workdir, config, preload=variant.preload, workers=ctx.settings.workers)
    faults = _schedule(ctx.settings, ctx.restart is not None)
    result: dict[str, t.Any] = {
        "variant": variant.name,
        **variant.config(),
        "expect": list(variant.expect),
        "faults": bool(faults),
    }
    try:
        ctx.tick("boot", 0.0)
        t0 = time.monotonic()
        server.start()
        result["boot_s"] = round(time.monotonic() - t0, 1)
        result.update(_measure(server, variant, table, ctx, faults))
    finally:
        t0 = time.monotonic()
        server.stop()
        result["stop_s"] = round(time.monotonic() - t0, 1)
    result["gunicorn"] = read_log(server.log(), ctx.settings.workers)
    anomalies, driver = hazards_of(variant, result)
    ok, why = verdict(variant, anomalies, driver)
    result.update(anomalies=anomalies, driver_hazards=driver, passed=ok, verdict=why)
    return result


def _apply_faults(
    faults: list[Fault],
    dsn: str,
    dbname: str,
    restart: Callable[[], str] | None,
    stop: threading.Event,
) -> None:
    start = time.monotonic()
    for fault in faults:
        if stop.wait(max(0.0, start + fault.at - time.monotonic())):
            return
        fault.done_at = time.time()
        with contextlib.suppress(Exception):
            if fault.kind == "terminate":
                fault.detail = f"terminated {terminate_app_backends(dsn, dbname)} backend(s)"
            elif restart is not None:
                fault.detail = restart()
