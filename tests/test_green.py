"""scoping.green: psycopg2 under gevent, and what an interrupted query leaves behind.

Every gevent run happens in a subprocess (tests/green_scripts/pg_interrupt.py)
that prints JSON; the statements of each run are tagged with a unique
``application_name`` so parallel runs never see each other's statements in
``pg_stat_activity``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import typing as t
import uuid

import pytest
from sqlalchemy import text

from tests._subproc import ROOT, Background, ChildRuns, run_python, selected_tests

if t.TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import sqlalchemy

SCRIPT = os.path.join(ROOT, "tests", "green_scripts", "pg_interrupt.py")

#: The children of the tests that need no server: they run side by side with
#: the interruption runs (fixture ``children``).
CHILD_RUNS: ChildRuns[Callable[[], t.Any]] = ChildRuns()


@CHILD_RUNS.of("test_import_does_not_import_gevent_or_psycopg2")
def import_child() -> t.Any:
    return run_python(
        """
        import json, sys
        import scoping.green
        print(json.dumps([m for m in ("gevent", "psycopg2", "psycogreen") if m in sys.modules]))
        """
    )


def test_import_does_not_import_gevent_or_psycopg2(children: Background[object, t.Any]) -> None:
    loaded = children.result("import_child")
    assert loaded == []


@CHILD_RUNS.of("test_patch_is_idempotent_and_reports_who_is_installed")
def idempotent_child() -> t.Any:
    return run_python(
        """
        import json
        import psycogreen.gevent
        from psycopg2 import extensions
        from scoping import green

        seen = {}
        seen["poll_constants"] = [
            (extensions.POLL_OK, extensions.POLL_READ, extensions.POLL_WRITE)
            == (green._POLL_OK, green._POLL_READ, green._POLL_WRITE)]
        seen["initial"] = [green.is_psycopg2_patched(), green.psycopg2_wait_callback() is None]
        first = green.patch_psycopg2()
        again = green.patch_psycopg2()
        seen["patched"] = [green.is_psycopg2_patched(), extensions.get_wait_callback() is first,
                           again is first, green.psycopg2_wait_callback() is first,
                           type(first).__module__]
        other = green.patch_psycopg2(drain_timeout=1.0)
        seen["new_drain_timeout"] = [other is not first, other.drain_timeout,
                                     green.psycopg2_wait_callback() is other]
        psycogreen.gevent.patch_psycopg()
        seen["psycogreen"] = [green.is_psycopg2_patched(),
                              green.psycopg2_wait_callback()
                              is psycogreen.gevent.gevent_wait_callback]
        replaced = green.patch_psycopg2()
        seen["replaced"] = [green.is_psycopg2_patched(), replaced is not other]
        green.unpatch_psycopg2()
        seen["unpatched"] = [green.is_psycopg2_patched(), green.psycopg2_wait_callback() is None]
        try:
            green.GeventWaitCallback(-1)
        except ValueError as exc:
            seen["negative"] = str(exc)
        print(json.dumps(seen))
        """
    )


def test_patch_is_idempotent_and_reports_who_is_installed(
    children: Background[object, t.Any],
) -> None:
    out = children.result("idempotent_child")
    assert out["poll_constants"] == [True]
    assert out["initial"] == [False, True]
    assert out["patched"] == [True, True, True, True, "scoping.green"]
    assert out["new_drain_timeout"] == [True, 1.0, True]
    assert out["psycogreen"] == [False, True]
    assert out["replaced"] == [True, True]
    assert out["unpatched"] == [False, True]
    assert "drain_timeout must be a finite number of seconds >= 0" in out["negative"]


def _active(engine: sqlalchemy.Engine, tag: str) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = :tag"
                    " AND state = 'active' AND query LIKE '%pg_sleep%'"
                ),
                {"tag": tag},
            ).scalars()
        )


def _run_interrupt(
    pg_url: str, pg_engine: sqlalchemy.Engine, callback: str, interruption: str
) -> tuple[dict[str, t.Any], list[int]]:
    """Run one interruption in a subprocess; return its JSON and the pids still active after it.

    Whatever the outcome, every statement of the run is cancelled before returning.
    """
    tag = f"scoping-green-{callback}-{interruption}-{uuid.uuid4().hex[:10]}"
    env = dict(os.environ, SCOPING_TEST_PG_URL=pg_url)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(
            [sys.executable, SCRIPT, callback, interruption, tag],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=ROOT,
        )
        assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        out: dict[str, t.Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        still_active = _active(pg_engine, tag)
    finally:
        with pg_engine.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = :tag AND pid <> pg_backend_pid()"
                ),
                {"tag": tag},
            )
    return out, still_active


#: The runs of each test: (callback, interruption) pairs; psycogreen and psycopg 3
#: ones only when the package is installed (their tests skip otherwise).
RUNS = {
    "test_scoping_callback_cancels_the_statement": [
        ("scoping", "timeout"),
        ("scoping", "kill"),
    ],
    "test_psycogreen_leaves_the_statement_running": [
        ("psycogreen", "timeout"),
        ("psycogreen", "kill"),
    ],
    "test_psycopg3_does_not_cancel_on_timeout_or_kill": [
        ("psycopg3", "timeout"),
        ("psycopg3", "kill"),
    ],
    "test_psycopg3_with_the_documented_cancel_recipe": [
        ("psycopg3-cancel", "timeout"),
        ("psycopg3-cancel", "kill"),
    ],
    "test_without_wait_callback_the_hub_blocks": [("none", "timeout")],
}
NEEDS = {"psycogreen": "psycogreen", "psycopg3": "psycopg", "psycopg3-cancel": "psycopg"}


@pytest.fixture(scope="module")
def children(request: pytest.FixtureRequest) -> Iterator[Background[object, t.Any]]:
    """Every selected test's child processes, side by side (they wait, mostly).

    Each interruption run (keyed by ``(callback, interruption)``) is its own child
    process with its own ``application_name`` tag, and what it leaves on the server
    is read as soon as it exits, as when the tests ran them one by one; only the
    waiting overlaps. They join when a server is there: their tests ask for
    ``pg_url`` themselves, so they skip (or fail) without one as before.
    """
    import importlib.util

    import sqlalchemy

    selected = selected_tests(request)
    jobs: dict[object, Callable[[], t.Any]] = {}
    start: list[object] = []
    engine = None
    if selected.intersection(RUNS):
        try:
            pg_url = request.getfixturevalue("pg_url")
        except (pytest.skip.Exception, pytest.fail.Exception):
            pass  # reported by the PostgreSQL tests themselves
        else:
            workers = 4  # each run holds 3 connections (a pool of 2, a monitor), here 1
            engine = sqlalchemy.create_engine(pg_url, pool_size=workers)
            # The longest first: the runs that watch a statement keep running for 1 s.
            runs = sorted(
                (run for test_runs in RUNS.values() for run in test_runs),
                key=lambda run: run[0] not in ("psycogreen", "psycopg3", "none"),
            )
            jobs.update(
                {run: functools.partial(_run_interrupt, pg_url, engine, *run) for run in runs}
            )
            start += [
                run
                for test, test_runs in RUNS.items()
                if test in selected
                for run in test_runs
                if run[0] not in NEEDS or importlib.util.find_spec(NEEDS[run[0]]) is not None
            ]
    # The drain child sleeps for 1.6 s: it starts with the longest runs.
    jobs = {"drain_child": CHILD_RUNS.by_name["drain_child"], **jobs}
    jobs.update(CHILD_RUNS.by_name)
    start += [run.__name__ for run in CHILD_RUNS.wanted(selected)]
    try:
        with Background(jobs, start=start, workers=4) as background:
            yield background
    finally:
        if engine is not None:
            engine.dispose()


def _assert_caller_saw_interruption(out: dict[str, t.Any], interruption: str) -> None:
    if interruption == "timeout":
        # The very Timeout object the caller started, not a wrapped error.
        assert out["raised"] == "Timeout"
        assert out["raised_is_our_timeout"] is True
        assert out["greenlet_exception"] == "Timeout"
        assert 0.3 <= out["elapsed"] < 2.0
    else:
        assert out["raised"] == "GreenletExit"
        assert out["raised_is_greenlet_exit"] is True
        assert out["greenlet_value"] == "GreenletExit"
    assert out["greenlet_dead"] is True


def _assert_pool_and_registry_recover(out: dict[str, t.Any]) -> None:
    # SQLAlchemy invalidated that one connection (a BaseException is a disconnect
    # for it, not for the pool); remove() checked it back in.
    assert out["sa_invalidated"] is True
    assert out["sqlalchemy_is_disconnect"] is True
    assert out["sqlalchemy_invalidate_pool"] is False
    assert out["registry_len_after_remove"] == 0
    assert out["checkedout_after_remove"] == 0
    assert out["next_request"] == 1
    assert out["checkedout_final"] == 0
    assert out["registry_len_final"] == 0


@pytest.mark.gevent
@pytest.mark.parametrize("interruption", ["timeout", "kill"])
def test_scoping_callback_cancels_the_statement(
    pg_url: str, children: Background[object, t.Any], interruption: str
) -> None:
    out, still_active = children.result(("scoping", interruption))
    _assert_caller_saw_interruption(out, interruption)
    # Gone from the server within one second of the interruption, and still gone.
    assert out["active_gone_after"] is not None
    assert out["active_gone_after"] < 1.0
    assert out["active_after_poll"] == 0
    assert still_active == []
    # psycopg2 closes any connection whose wait callback raised (closed == 2,
    # "broken"), even after the drain; SQLAlchemy then invalidates it.
    assert out["driver_closed_before_sqlalchemy"] == 2
    _assert_pool_and_registry_recover(out)
    if interruption == "timeout":
        # The hub kept running while the query waited (ticker every 20 ms).
        assert out["ticks_during"] >= 3


@pytest.mark.gevent
@pytest.mark.parametrize("interruption", ["timeout", "kill"])
def test_psycogreen_leaves_the_statement_running(
    pg_url: str, children: Background[object, t.Any], interruption: str
) -> None:
    pytest.importorskip("psycogreen")
    out, still_active = children.result(("psycogreen", interruption))
    _assert_caller_saw_interruption(out, interruption)
    # The client side looks just as clean ...
    assert out["driver_closed_before_sqlalchemy"] == 2
    _assert_pool_and_registry_recover(out)
    # ... but the server still runs pg_sleep(20) a second later, and after the
    # process has exited (cancelled by _run_interrupt's cleanup).
    assert out["active_gone_after"] is None
    assert out["active_after_poll"] == 1
    assert len(still_active) == 1


@pytest.mark.gevent
@pytest.mark.parametrize("interruption", ["timeout", "kill"])
def test_psycopg3_does_not_cancel_on_timeout_or_kill(
    pg_url: str, children: Background[object, t.Any], interruption: str
) -> None:
    """psycopg 3.3 is cooperative under gevent, but cancels only on KeyboardInterrupt/SystemExit."""
    pytest.importorskip("psycopg")
    out, still_active = children.result(("psycopg3", interruption))
    _assert_caller_saw_interruption(out, interruption)
    if interruption == "timeout":
        assert out["ticks_during"] >= 3  # cooperative: the hub ran during the wait
    # The driver leaves its connection open (busy); SQLAlchemy invalidates it.
    assert out["driver_closed_before_sqlalchemy"] == 0
    _assert_pool_and_registry_recover(out)
    assert out["active_after_poll"] == 1
    assert len(still_active) == 1


@pytest.mark.gevent
@pytest.mark.parametrize("interruption", ["timeout", "kill"])
def test_psycopg3_with_the_documented_cancel_recipe(
    pg_url: str, children: Background[object, t.Any], interruption: str
) -> None:
    """README (psycopg 3): a handle_error listener calling cancel_safe() stops the statement."""
    pytest.importorskip("psycopg")
    out, still_active = children.result(("psycopg3-cancel", interruption))
    _assert_caller_saw_interruption(out, interruption)
    _assert_pool_and_registry_recover(out)
    assert out["active_gone_after"] is not None
    assert out["active_gone_after"] < 1.0
    assert still_active == []


@pytest.mark.gevent
def test_without_wait_callback_the_hub_blocks(
    pg_url: str, children: Background[object, t.Any]
) -> None:
    """No callback: Timeout(0.3) around pg_sleep(1) cannot fire; no greenlet runs meanwhile."""
    out, still_active = children.result(("none", "timeout"))
    assert out["elapsed"] >= 1.0
    assert out["raised"] is None
    assert out["ticks_during"] == 0
    assert still_active == []


@CHILD_RUNS.of("test_drain_is_bounded_and_a_second_interruption_wins")
def drain_child() -> t.Any:
    return run_python(
        """
        import json, socket, time
        import gevent
        from psycopg2.extensions import POLL_OK, POLL_READ
        from scoping.green import GeventWaitCallback

        class Conn:
            # poll() says "wait for reading" on a socket that never becomes
            # readable, until `answer_after_cancel` cancels were sent.
            def __init__(self, answer_after_cancel=None, cancel_error=False):
                self.a, self.b = socket.socketpair()
                self.cancels = 0
                self.polls = 0
                self.answer_after_cancel = answer_after_cancel
                self.cancel_error = cancel_error
            def fileno(self):
                return self.a.fileno()
            def poll(self):
                self.polls += 1
                after = self.answer_after_cancel
                if after is not None and self.cancels >= after:
                    return POLL_OK
                return POLL_READ
            def cancel(self):
                if self.cancel_error:
                    raise RuntimeError("cannot cancel")
                self.cancels += 1

        def run(conn, drain, outer=None):
            cb = GeventWaitCallback(drain)
            t0 = time.monotonic()
            inner = gevent.Timeout(0.1)
            outer_t = gevent.Timeout(outer) if outer else None
            raised = None
            try:
                if outer_t: outer_t.start()
                inner.start()
                cb(conn)
            except BaseException as exc:
                raised = "inner" if exc is inner else "outer" if exc is outer_t else repr(exc)
            finally:
                inner.close()
                if outer_t: outer_t.close()
            return {"raised": raised, "elapsed": round(time.monotonic() - t0, 2),
                    "cancels": conn.cancels}

        # The cases are independent (own socket, own callback, own timeouts, all
        # waits cooperative): they run side by side, one greenlet each.
        cases = {
            "dead_server": gevent.spawn(run, Conn(), drain=1.5),
            "answers": gevent.spawn(run, Conn(answer_after_cancel=1), drain=5),
            "answers_second_cancel": gevent.spawn(run, Conn(answer_after_cancel=2), drain=5),
            "cancel_fails": gevent.spawn(run, Conn(cancel_error=True), drain=5),
            "outer_timeout": gevent.spawn(run, Conn(), drain=5, outer=0.4),
        }
        gevent.joinall(list(cases.values()), timeout=30, raise_error=True)
        print(json.dumps({name: g.get(block=False) for name, g in cases.items()}))
        """
    )


@pytest.mark.gevent
def test_drain_is_bounded_and_a_second_interruption_wins(
    children: Background[object, t.Any],
) -> None:
    """Fake connections: a server that never answers, a cancel that fails, a second Timeout."""
    out = children.result("drain_child")
    dead = out["dead_server"]
    # Cancel at once and again after 1 s, give up at 1.5 s, re-raise the Timeout.
    assert dead["raised"] == "inner"
    assert dead["cancels"] == 2
    assert 1.5 <= dead["elapsed"] < 2.5
    assert out["answers"]["raised"] == "inner"
    assert out["answers"]["cancels"] == 1
    assert out["answers"]["elapsed"] < 0.5
    # The first cancel was "lost" (reached the server before the statement): retried.
    assert out["answers_second_cancel"]["cancels"] == 2
    assert 1.0 <= out["answers_second_cancel"]["elapsed"] < 2.0
    assert out["cancel_fails"]["raised"] == "inner"
    assert out["cancel_fails"]["cancels"] == 0
    assert out["cancel_fails"]["elapsed"] < 0.5
    # An outer Timeout firing during the drain ends it and reaches its own block.
    assert out["outer_timeout"]["raised"] == "outer"
    assert 0.4 <= out["outer_timeout"]["elapsed"] < 1.0
