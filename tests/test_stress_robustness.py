"""The harness refuses bad options before anything runs, stops every cell on time,
exits cleanly on signals and reaps what a killed run left behind.

Signals are sent by PID to a real ``python -m stress`` process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing as t

import pytest

from stress.childproc import ROOT, child_env
from stress.runner import CellRun, run_cell
from tests._subproc import Background, selected_tests

if t.TYPE_CHECKING:
    from collections.abc import Callable, Iterator

# A DSN nobody listens on: an option that got as far as connecting would fail
# with a message about it, so a message about the option proves nothing ran.
NOWHERE = "postgresql://nobody@127.0.0.1:1/nothing"


def _stress(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=child_env(),
    )


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--duration", "nan"], "--duration"),
        (["--duration", "inf"], "--duration"),
        (["--duration", "-1"], "--duration"),
        (["--duration", "0"], "--duration"),
        (["--stall", "-1"], "--stall"),
        (["--stall", "0"], "--stall"),
        (["--stall", "nan"], "--stall"),
        (["--scenarios", ","], "--scenarios"),
        (["--strategies", " , "], "--strategies"),
        (["--json", "/nonexistent-h5-dir/run.json"], "--json"),
        (["--json", "/tmp"], "--json"),
        (["--concurrency", "0"], "--concurrency"),
        (["--requests", "-5"], "--requests"),
        (["--fail-rate", "nan"], "--fail-rate"),
        (["--kill-rate", "1.5"], "--kill-rate"),
    ],
)
def test_bad_option_is_refused_before_anything_runs(
    args: list[str], names: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from stress import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["--dsn", NOWHERE, *args])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("stress: ")
    assert names in lines[0], lines[0]
    assert "127.0.0.1:1" not in lines[0]  # never got as far as the server


def _deadline_cell() -> tuple[CellRun, float]:
    """A cell that emits a finished request every few ms forever; and how long it took."""
    code = (
        "import json, time\n"
        "print(json.dumps({'ev': 'ready'}), flush=True)\n"
        "i = 0\n"
        "while True:\n"
        "    print(json.dumps({'ev': 'req', 'rid': f'r{i}', 'outcome': 'ok'}), flush=True)\n"
        "    i += 1\n"
        "    time.sleep(0.005)\n"
    )
    t0 = time.monotonic()
    run = run_cell({}, stall=0.5, deadline=2.0, command=[sys.executable, "-c", code])
    return run, time.monotonic() - t0


def _forking_cell() -> tuple[CellRun, bool]:
    """A cell that forked a child, stopped at its deadline; and whether the child outlived
    it (still there 5 s after run_cell returned)."""
    code = (
        "import json, os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(60); os._exit(0)\n"
        "print(json.dumps({'ev': 'ready', 'driver': str(pid)}), flush=True)\n"
        "time.sleep(60)\n"
    )
    run = run_cell({}, stall=0.5, deadline=1.5, command=[sys.executable, "-c", code])
    child = int(run.driver or 0)
    if child <= 0:
        return run, False
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return run, False
        time.sleep(0.05)
    return run, True


def _too_many_connections(pg_server: t.Any) -> tuple[int | None, str, list[str]]:
    """``--concurrency 5000``: the exit status, stderr, and the databases it left."""
    proc = _start(pg_server, "--quick", "--concurrency", "5000")
    _out, err = proc.communicate(timeout=60)
    return proc.returncode, err, _databases_of(pg_server, proc.pid)


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest) -> Iterator[Background[str, t.Any]]:
    """The default tests' processes and cells, started together; each test waits for its
    own (they mostly sleep: the cells run until their deadline). Cells lead their own
    process groups, so they never see each other.

    ``too_many``: when a server is there (its test asks for ``pg_server`` itself, so it
    skips or fails without one as before).
    """
    selected = selected_tests(request)
    jobs: dict[str, Callable[[], t.Any]] = {
        "forking": _forking_cell,
        "deadline": _deadline_cell,
        "bad_option": lambda: _stress("--dsn", NOWHERE, "--duration", "nan"),
    }
    tests = {
        "forking": "test_the_cell_and_what_it_forked_are_killed_together",
        "deadline": "test_deadline_stops_a_cell_that_keeps_reporting",
        "bad_option": "test_a_bad_option_ends_the_process_with_one_line_and_status_2",
    }
    start = [key for key, test in tests.items() if test in selected]
    if "test_concurrency_above_max_connections_is_refused_up_front" in selected:
        try:
            server = request.getfixturevalue("pg_server")
        except (pytest.skip.Exception, pytest.fail.Exception):
            pass  # reported by the test itself
        else:
            jobs["too_many"] = lambda: _too_many_connections(server)
            start.append("too_many")
    with Background(jobs, start=start, workers=4) as background:
        yield background


def test_a_bad_option_ends_the_process_with_one_line_and_status_2(
    runs: Background[str, t.Any],
) -> None:
    out = runs.result("bad_option")
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "stress: --duration must be a finite number of seconds above 0, not nan"
    ]


def test_json_into_a_missing_directory_names_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    from stress import cli

    with pytest.raises(SystemExit):
        cli.main(["--dsn", NOWHERE, "--json", "/nonexistent-h5-dir/run.json"])
    assert "does not exist; create it first" in capsys.readouterr().err


def test_deadline_stops_a_cell_that_keeps_reporting(runs: Background[str, t.Any]) -> None:
    """A cell that emits a finished request every few ms forever still ends at its deadline."""
    run, took = runs.result("deadline")
    assert run.hang
    assert run.hang_reason == "cell passed its 2 s deadline"
    assert len(run.records) > 50  # it was busy, never stalled
    assert run.returncode == -signal.SIGKILL
    assert took < 15


def test_the_cell_and_what_it_forked_are_killed_together(runs: Background[str, t.Any]) -> None:
    run, outlived = runs.result("forking")
    assert run.hang
    child = int(run.driver or 0)
    assert child > 0
    if outlived:
        pytest.fail(f"the cell's forked child {child} outlived it")


# --------------------------------------------------------------------- with a server


def _databases_of(pg_server: t.Any, pid: int) -> list[str]:
    import psycopg2

    conn = psycopg2.connect(pg_server.dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"stress\\_{pid}\\_%",)
            )
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def _start(pg_server: t.Any, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=child_env({"SCOPING_DSN": pg_server.dsn}),
        start_new_session=True,
    )


def _wait_for_database(pg_server: t.Any, proc: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = _databases_of(pg_server, proc.pid)
        if names:
            time.sleep(1.0)  # let a cell start
            return names[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run never created its database")


@pytest.mark.postgres
def test_concurrency_above_max_connections_is_refused_up_front(
    pg_server: t.Any, runs: Background[str, t.Any]
) -> None:
    returncode, err, databases = runs.result("too_many")
    assert returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "--concurrency 5000" in lines[0]
    assert "max_connections" in lines[0]
    assert "or less" in lines[0]  # says what to change
    assert databases == []


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_drops_the_database_and_exits_without_traceback(
    pg_server: t.Any, signum: int, status: int
) -> None:
    proc = _start(
        pg_server, "--scenarios", "no-remove", "--strategies", "auto", "--requests", "5000"
    )
    name = _wait_for_database(pg_server, proc)
    os.kill(proc.pid, signum)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("stress: ")
    assert name not in _databases_of(pg_server, proc.pid)


@pytest.mark.slow
def test_a_later_run_reaps_what_a_killed_run_left(pg_server: t.Any, tmp_path: t.Any) -> None:
    first = _start(
        pg_server, "--scenarios", "no-remove", "--strategies", "auto", "--requests", "5000"
    )
    name = _wait_for_database(pg_server, first)
    import psutil

    cells = psutil.Process(first.pid).children(recursive=True)
    assert cells  # the cell serving the run
    os.killpg(first.pid, signal.SIGKILL)  # the run: nothing gets to clean up
    first.communicate(timeout=30)
    assert _databases_of(pg_server, first.pid) == [name]
    # A cell leads its own session, so the kill does not reach it: it must
    # notice that its run is gone and end, never wait forever as an orphan.
    _gone, alive = psutil.wait_procs(cells, timeout=10)
    assert alive == []
    report = tmp_path / "second.json"
    second = _start(
        pg_server,
        "--scenarios",
        "no-remove",
        "--strategies",
        "auto",
        "--requests",
        "10",
        "--json",
        str(report),
    )
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, out[-2000:] + err[-2000:]
    assert _databases_of(pg_server, first.pid) == []
    assert json.loads(report.read_text())["verdict"]["ok"] is True
