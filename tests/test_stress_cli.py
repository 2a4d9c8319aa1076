"""``python -m stress`` end to end, as a subprocess (gevent never patches this process).

The default run has a tiny matrix against PostgreSQL (one scenario, its baseline
and one strategy); the whole ``--quick`` matrix, as CI runs it, is marked slow.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap
import typing as t

import pytest

from stress import runner
from stress.childproc import ROOT, child_env
from stress.detectors import anomalies
from stress.runner import run_cell
from stress.scenarios import SCENARIOS, SETUPS, STRATEGIES
from tests._subproc import Background, selected_tests

if t.TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path


def _stress(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None, cwd: str = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=child_env(env),
    )


def _narrow(text: str) -> list[str]:
    """The lines of ``text`` wider than 80 columns."""
    return [line for line in text.splitlines() if len(line) > 80]


def test_help_explains_every_scenario(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from stress import cli

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    stdout = capsys.readouterr().out
    assert _narrow(stdout) == []
    for scenario in SCENARIOS.values():
        line = next(ln for ln in stdout.splitlines() if ln.strip().startswith(scenario.name))
        assert scenario.summary[:30] in " ".join(stdout.split())
        assert line.strip() != scenario.name  # the name comes with its one-line summary
    for option in (
        "--quick",
        "--scenarios",
        "--strategies",
        "--concurrency",
        "--requests",
        "--duration",
        "--dsn",
        "--json",
        "--seed",
    ):
        assert option in stdout


def _tiny_matrix(dsn: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return _stress(
        "--json",
        "tiny.json",  # relative: the run happens in cwd, outside the checkout
        "--scenarios",
        "no-remove",
        "--strategies",
        "auto",
        "--requests",
        "20",
        "--concurrency",
        "4",
        env={"SCOPING_DSN": dsn},
        cwd=str(cwd),
    )


@pytest.fixture(scope="module")
def stress_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Background[str, t.Any]]:
    """The ``python -m stress`` processes of the default tests, started together, so that
    they run while the in-process tests below wait for their stuck cells.

    ``tiny``: ``(the process, its directory)``, when a server is there (its test asks for
    ``pg_server`` itself, so it skips or fails without one as before).
    """
    selected = selected_tests(request)
    jobs: dict[str, Callable[[], t.Any]] = {
        "bad_dsn": functools.partial(
            _stress, "--quick", "--dsn", "postgresql://nobody@127.0.0.1:1/nothing"
        )
    }
    start = ["bad_dsn"] if "test_bad_dsn_is_one_line_and_fails" in selected else []
    if "test_tiny_matrix_against_postgres" in selected:
        try:
            server = request.getfixturevalue("pg_server")
        except (pytest.skip.Exception, pytest.fail.Exception):
            pass  # reported by test_tiny_matrix_against_postgres itself
        else:
            cwd = tmp_path_factory.mktemp("tiny")
            jobs["tiny"] = lambda: (_tiny_matrix(server.dsn, cwd), cwd)
            start.insert(0, "tiny")
    with Background(jobs, start=start) as background:
        yield background


def test_bad_dsn_is_one_line_and_fails(stress_runs: Background[str, t.Any]) -> None:
    out = stress_runs.result("bad_dsn")
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("stress: ")
    assert "127.0.0.1:1" in lines[0]
    assert "Traceback" not in out.stderr


def test_unknown_scenario_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from stress import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["--scenarios", "late-patch,nope"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "stress: unknown scenario: nope (choose from: "
        + ", ".join(SCENARIOS)
        + ") (--scenarios/--strategies)"
    ]


def test_in_memory_sqlite_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from stress import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["--dsn", "sqlite://"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("py_spy", [True, False], ids=["py-spy", "faulthandler"])
def test_a_stuck_cell_is_reported_as_a_hang_with_its_stack(
    py_spy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process whose only thread blocks for good (as in libpq) is caught from outside."""
    if not py_spy:
        monkeypatch.setattr(runner, "_py_spy", lambda: None)
    code = textwrap.dedent(
        """
        import faulthandler, json, signal, sys, threading
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        print(json.dumps({"ev": "ready", "driver": "test"}), flush=True)
        print(json.dumps({"ev": "req", "rid": "r0", "outcome": "ok"}), flush=True)
        lock = threading.Lock()
        lock.acquire()
        lock.acquire()  # never returns: no timer in this process can fire
        """
    )
    run = run_cell({}, stall=1.0, deadline=30.0, command=[sys.executable, "-c", code])
    assert run.hang
    assert run.hang_reason == "no request finished for 1 s"
    assert [r.rid for r in run.records] == ["r0"]
    assert run.probe is None
    assert run.returncode == -9  # killed by the watcher
    if py_spy and runner._py_spy() is None:
        pytest.skip("py-spy is not installed")
    if py_spy:
        assert run.stack.startswith(("py-spy dump:", "faulthandler:"))  # py-spy may lack ptrace
    else:
        assert run.stack.startswith("faulthandler:")
        assert 'File "<string>", line 8 in <module>' in run.stack
    assert "<module>" in run.stack
    assert run.wall < 25


def test_a_cell_that_dies_is_a_crash_not_a_hang() -> None:
    code = 'import json; print(json.dumps({"ev": "ready"}), flush=True); raise SystemExit(3)'
    run = run_cell({}, stall=5.0, deadline=30.0, command=[sys.executable, "-c", code])
    assert not run.hang
    assert run.probe is None
    assert run.returncode == 3


def _load(path: t.Any) -> dict[str, t.Any]:
    with open(path, encoding="utf-8") as f:
        return t.cast(dict[str, t.Any], json.load(f))


@pytest.mark.slow
def test_sqlite_run_says_what_it_cannot_show(tmp_path: t.Any) -> None:
    report = tmp_path / "sqlite.json"
    out = _stress(
        "--dsn",
        f"sqlite:///{tmp_path / 'stress.db'}",
        "--scenarios",
        "ident-reuse,no-remove,timeout-kill",
        "--strategies",
        "greenlet,auto",
        "--quick",
        "--json",
        str(report),
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = _load(report)
    assert doc["database"]["dialect"] == "sqlite"
    assert any("SQLite" in note and "pg_stat_activity" in note for note in doc["notes"])
    assert "argv" not in doc
    cells = {(c["scenario"], c["setup"]): c for c in doc["cells"]}
    assert len(cells) == 9
    for setup in ("baseline", "greenlet", "auto"):
        assert cells["timeout-kill", setup]["status"] == "n/a"
        assert "PostgreSQL" in cells["timeout-kill", setup]["reason"]
    assert cells["no-remove", "baseline"]["metrics"]["registry"] > 0
    assert cells["ident-reuse", "baseline"]["ok"] is True
    for s in ("ident-reuse", "no-remove"):
        for setup in ("greenlet", "auto"):
            assert anomalies(cells[s, setup]["metrics"]) == {}
    assert out.stdout.strip().splitlines()[-1].startswith("OK: 2 baselines")


@pytest.mark.postgres
def test_tiny_matrix_against_postgres(
    pg_server: t.Any, stress_runs: Background[str, t.Any]
) -> None:
    """The default run's end-to-end check: one baseline and one strategy, piped output
    no wider than 80 columns, the verdict last."""
    out, cwd = stress_runs.result("tiny")
    report = cwd / "tiny.json"
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert _narrow(out.stdout) == []
    assert _narrow(out.stderr) == []
    assert out.stdout.strip().splitlines()[-1] == (
        "OK: 1 baselines reproduced their hazard; 1 strategy cells had zero anomalies"
    )
    progress = [ln for ln in out.stderr.splitlines() if ln.startswith("[")]
    assert [ln.split(":")[0] for ln in progress] == [
        "[ 1/2] no-remove / baseline",
        "[ 2/2] no-remove / auto",
    ]
    table = out.stdout.splitlines()
    row = next(ln for ln in table if ln.startswith("no-remove"))
    assert row.split()[1:] == ["yes[1]", "ok"]
    doc = _load(report)
    cells = {c["setup"]: c for c in doc["cells"]}
    assert cells["baseline"]["metrics"]["registry"] > 0
    assert anomalies(cells["auto"]["metrics"]) == {}
    assert cells["auto"]["metrics"]["requests"] == 20


@pytest.mark.slow
@pytest.mark.postgres
def test_quick_matrix_against_postgres(pg_server: t.Any, tmp_path: t.Any) -> None:
    """The CI run: every strategy clean, every baseline shows its hazard, exit 0."""
    report = tmp_path / "quick.json"
    out = _stress(
        "--quick",
        "--json",
        "quick.json",  # relative: the run happens in tmp_path, outside the checkout
        env={"SCOPING_DSN": pg_server.dsn},
        timeout=600,
        cwd=str(tmp_path),
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    assert (
        out.stdout.strip().splitlines()[-1].startswith(f"OK: {len(SCENARIOS)} baselines reproduced")
    )
    assert _narrow(out.stdout) == []
    assert _narrow(out.stderr) == []
    doc = _load(report)
    assert doc["verdict"]["ok"] is True
    assert doc["database"]["dialect"] == "postgresql"
    assert doc["database"]["server_version"]
    assert "password" not in json.dumps(doc["database"]).lower() or "***" in json.dumps(doc)
    versions = doc["environment"]["versions"]
    for dist in ("sqlalchemy", "gevent", "greenlet", "psycopg2-binary"):
        assert versions[dist], dist
    assert doc["options"]["quick"] is True
    assert doc["options"]["seed"] == 1
    cells = {(c["scenario"], c["setup"]): c for c in doc["cells"]}
    assert set(cells) == {(s, setup) for s in SCENARIOS for setup in SETUPS}
    not_applicable = {k for k, c in cells.items() if c["status"] == "n/a"}
    assert not_applicable == {(s, st) for s in SCENARIOS for st in SCENARIOS[s].not_applicable}
    assert len(not_applicable) == 12
    for key, cell in cells.items():
        if key in not_applicable:
            assert "not a fix here" in cell["reason"]
            continue
        m = cell["metrics"]
        if cell["kind"] == "strategy":
            assert key[1] in STRATEGIES
            assert cell["status"] == "clean", (key, cell["reason"])
            assert anomalies(m) == {}, key
            assert m["requests"] == m["expected"] >= 60, key
            assert (m["registry"], m["checkedout"]) == (0, 0), key
        else:
            assert cell["ok"] is True, (key, cell["reason"])
            assert any((m.get(tgt) or 0) > 0 for tgt in cell["targets"]), key
    # the hazards that only PostgreSQL shows
    assert cells["timeout-kill", "baseline"]["metrics"]["lingering"] > 0
    assert cells["no-remove", "baseline"]["metrics"]["registry"] > 0
    ident = cells["ident-reuse", "baseline"]["metrics"]
    assert ident["stale"] > 0
    assert ident["db_failed"] > 0
    to_thread = cells["to-thread", "baseline"]["metrics"]
    assert to_thread["stale"] > 0
    assert to_thread["db_failed"] > 0
    orphan = cells["orphan-task", "baseline"]["metrics"]
    assert orphan["registry"] > 0
    assert orphan["dup"] > 0
