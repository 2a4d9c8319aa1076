"""``python -m stress.http``: real gunicorn gevent workers, real Locust, the audit (issue 11).

The slow test runs ``--quick`` end to end and asserts the audit in its JSON.
The others check, without a server, what must hold before anything runs:
bad flags are refused, files that hold the DSN are private, the table fits 80
columns, and each variant's verdict follows the exit rule.
"""

from __future__ import annotations

import functools
import json
import os
import stat
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest

from stress.http import cli, run, variants
from stress.http.gunicorn import Gunicorn, read_log
from tests._subproc import Background, selected_params

if t.TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(os.path.abspath(__file__)).parent.parent


def _http(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "stress.http", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


BAD_FLAGS = [
    (["--duration", "nan"], "give a finite number above 0"),
    (["--duration", "-3"], "give a finite number above 0"),
    (["--users", "0"], "give a whole number of at least 1"),
    (["--variants", "nope"], "unknown variant 'nope'; choose from:"),
    (["--json", "/nonexistent-dir/x.json"], "directory /nonexistent-dir does not exist"),
    (["--dsn", "postgresql://u@h/db"], "--dsn needs --server find"),
]


@pytest.fixture(scope="module")
def bad_flag_runs(
    request: pytest.FixtureRequest,
) -> Iterator[Background[tuple[str, ...], subprocess.CompletedProcess[str]]]:
    """One ``python -m stress.http`` per bad flag, side by side; each test waits for its own."""
    test = "test_bad_flags_are_refused_before_anything_runs"
    jobs = {tuple(args): functools.partial(_http, *args, timeout=60) for args, _ in BAD_FLAGS}
    start = [tuple(args) for args in selected_params(request, test, "args")]
    with Background(jobs, start=start) as background:
        yield background


@pytest.mark.parametrize(("args", "message"), BAD_FLAGS)
def test_bad_flags_are_refused_before_anything_runs(
    args: list[str],
    message: str,
    bad_flag_runs: Background[tuple[str, ...], subprocess.CompletedProcess[str]],
) -> None:
    proc = bad_flag_runs.result(tuple(args))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_strategy_and_hazard_has_a_variant() -> None:
    from scoping.scopes import STRATEGY_NAMES

    every = variants.all_variants()
    names = [v.name for v in every]
    assert len(names) == len(set(names))
    assert {v.strategy for v in every if not v.naive} == set(STRATEGY_NAMES)
    assert {v.orm for v in every} == {"flask-sqlalchemy", "sqlalchemy", "scoping"}
    assert {v.driver for v in every} == set(variants.DRIVERS)
    quick = variants.quick_variants()
    assert {v.strategy for v in quick if not v.naive} == set(STRATEGY_NAMES)
    assert {h for v in quick for h in v.expect} == {"collapse", "lingering"}


def test_config_files_are_private_and_argv_holds_no_dsn(tmp_path: Path) -> None:
    secret = "postgresql+psycopg2://u:s3cret@127.0.0.1:1/db"
    server = Gunicorn(str(tmp_path), {"url": secret, "orm": "scoping"}, preload=True)
    for path in (server.config_path, server.conf_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "s3cret" not in Path(server.conf_path).read_text()
    assert all("s3cret" not in v for v in server.env().values())


def _result(variant: variants.Variant, **audit: int) -> dict[str, t.Any]:
    base = {
        "lost": 0,
        "committed_failed": 0,
        "committed_on_error": 0,
        "errors": 0,
        "unacked": 3,
        "unacked_committed": 2,
        "timeouts_not_fired": 0,
    }
    base.update(audit)
    result: dict[str, t.Any] = {
        "variant": variant.name,
        "expect": list(variant.expect),
        "faults": False,
        "stats": {"rps": 1234.5, "p50_ms": 12.0, "p99_ms": 99999.0},
        "audit": base,
        "after": {"idle_in_tx": 0},
        "probe": {"lingering": 0, "timeout_ignored": 0},
        "gunicorn": {
            "worker_timeouts": 0,
            "worker_restarts": 0,
            "exceptions": {},
            "doctor_hazards": [],
        },
        "recovery": None,
    }
    anomalies, driver = run.hazards_of(variant, result)
    ok, why = run.verdict(variant, anomalies, driver)
    result.update(anomalies=anomalies, driver_hazards=driver, passed=ok, verdict=why)
    return result


def test_verdicts_follow_the_exit_rule() -> None:
    by_name = {v.name: v for v in variants.all_variants()}
    collapse = by_name["sqlalchemy/psycogreen/preload"]
    assert not _result(collapse)["passed"]  # the hazard must be reproduced
    assert _result(collapse, errors=5)["verdict"] == "REPRODUCED"
    clean = by_name["greenlet/green/preload"]
    assert _result(clean)["passed"]
    assert _result(clean, committed_failed=1)["verdict"] == "ANOMALY committed_failed"
    psycogreen = by_name["greenlet/psycogreen"]
    r = _result(psycogreen)
    r["probe"]["lingering"] = 6
    anomalies, driver = run.hazards_of(psycogreen, r)
    assert (anomalies, driver) == ([], ["lingering"])
    assert run.verdict(psycogreen, anomalies, driver) == (True, "OK")  # the driver's hazard
    blocking = by_name["greenlet/none"]
    r = _result(blocking)
    r["probe"]["timeout_ignored"] = 6
    r["gunicorn"]["doctor_hazards"] = ["psycopg2.blocking"]
    assert run.hazards_of(blocking, r) == ([], ["timeout_ignored"])
    r["gunicorn"]["doctor_hazards"].append("scoped_session.shared")
    assert run.hazards_of(blocking, r) == (["doctor"], ["timeout_ignored"])


def test_table_fits_80_columns() -> None:
    rows = [_result(v, errors=123456) for v in variants.all_variants()]
    for r in rows:
        r["stats"].update(p50_ms=10234.0, p99_ms=170000.0, rps=123456.0)
    rows.append({"variant": "token/green", "expect": [], "error": "RuntimeError: " + "x" * 300})
    text = cli.format_table(rows, "title")
    assert max(len(line) for line in text.splitlines()) <= cli.WIDTH


def test_gunicorn_log_reading() -> None:
    log = "\n".join(
        [
            "[1] [INFO] Booting worker with pid: 11",
            "[1] [INFO] Booting worker with pid: 12",
            "[1] [CRITICAL] WORKER TIMEOUT (pid:11)",
            "[1] [INFO] Booting worker with pid: 13",
            "stress-http doctor pid=13 hazards=engine.inherited_connections,scoped_session.shared",
            "sqlalchemy.exc.IllegalStateChangeError: Method 'close()' can't be called here",
            "RuntimeError: request x fails after flush, on purpose",
        ]
    )
    assert read_log(log, workers=2) == {
        "worker_timeouts": 1,
        "worker_restarts": 1,
        "doctor_hazards": ["engine.inherited_connections", "scoped_session.shared"],
        "exceptions": {"IllegalStateChangeError": 1},
    }


def test_audit_counts_every_kind_of_write() -> None:
    journal = [
        [1.0, "create", "a", 201],  # acknowledged, present
        [1.0, "create", "b", 201],  # acknowledged, LOST
        [1.0, "create", "c", 500],  # error answer, yet committed
        [1.0, "create", "d", None],  # never answered, committed
        [1.0, "fail", "e", 500],  # raised after flush, yet committed
        [1.0, "timeout", "f", 504],  # timed out, not committed
        [1.0, "read", "a", 404],  # an acknowledged write not found
        [1.0, "create", "g", 0],  # no answer (refused, reset, client timeout): not an error
    ]
    rows = {"a": "create", "c": "create", "d": "create", "e": "fail", "zz": "create"}
    audit = run.audit(journal, rows, faults=False)
    assert {
        k: audit[k]
        for k in (
            "writes_acked",
            "lost",
            "committed_failed",
            "committed_on_error",
            "unacked",
            "unacked_committed",
            "errors",
            "phantom_rows",
        )
    } == {
        "writes_acked": 2,
        "lost": 1,
        "committed_failed": 1,
        "committed_on_error": 1,
        "unacked": 3,
        "unacked_committed": 2,
        "errors": 2,
        "phantom_rows": 1,
    }


@pytest.mark.slow
@pytest.mark.gevent
def test_quick_run_reproduces_the_hazards_and_scoping_shows_none(tmp_path: Path) -> None:
    out = tmp_path / "http.json"
    proc = _http("--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] is True
    assert report["elapsed_s"] < 180 or os.environ.get("CI")  # --quick budget on 2 cores
    assert max(len(line) for line in proc.stdout.splitlines()) <= cli.WIDTH
    results = {r["variant"]: r for r in report["results"]}
    collapse = results["sqlalchemy/psycogreen/preload"]
    assert collapse["anomalies"], collapse
    assert "engine.inherited_connections" in collapse["gunicorn"]["doctor_hazards"]
    assert results["flask-sqlalchemy/psycogreen"]["probe"]["lingering"] > 0
    for name, r in results.items():
        if r["orm"] != "scoping":
            continue
        a = r["audit"]
        assert a["writes_acked"] > 0, name
        assert (a["lost"], a["committed_failed"], a["committed_on_error"]) == (0, 0, 0), name
        assert a["errors"] == 0, name
        assert r["after"]["idle_in_tx"] == 0, name
        assert r["gunicorn"]["worker_timeouts"] == 0
        assert r["gunicorn"]["doctor_hazards"] == []
        if r["driver"] == "green":
            assert r["probe"]["lingering"] == 0, name
    # No secret anywhere in what the run printed or wrote.
    assert "password" not in out.read_text().lower()
