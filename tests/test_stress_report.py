"""The text report fits 80 columns, and the harness has one home per concept."""

from __future__ import annotations

import ast
import pathlib
import typing as t

import pytest

from stress.report import markdown, render, verdict
from stress.scenarios import BASELINE, SCENARIOS, SETUPS, STRATEGIES, not_applicable

STRESS = pathlib.Path(__file__).resolve().parent.parent / "stress"


def _cell(scenario: str, setup: str, status: str, reason: str) -> dict[str, t.Any]:
    kind = "baseline" if setup == BASELINE else "strategy"
    ok = None if status == "n/a" else status in ("clean", "hazard", "HANG")
    return {
        "scenario": scenario,
        "setup": setup,
        "kind": kind,
        "status": status,
        "ok": ok,
        "reason": reason,
        "hang_reason": "no request finished for 10 s",
        "metrics": {
            "errors_by_class": {"InvalidRequestError": 12, "DetachedInstanceError": 310},
            "outcomes": {"ok": 3},
        },
    }


def _doc(cells: list[dict[str, t.Any]]) -> dict[str, t.Any]:
    return {
        "database": {
            "masked_url": "postgresql+psycopg2://postgres:***@127.0.0.1:5432/"
            "stress_4242_8123456_1a2b3c4d_9f8e7d",
            "server_version": "15.20 (Debian 15.20-0+deb12u1)",
        },
        "options": {"seed": 1},
        "notes": ["SQLite: " + "a long note that must wrap " * 8],
        "cells": cells,
    }


def _worst_case() -> list[dict[str, t.Any]]:
    """Every cell of the matrix, each in a state that prints a long note."""
    statuses = ["HANG", "ANOMALY", "CRASH", "MISSED", "hazard"]
    cells = []
    for i, name in enumerate(SCENARIOS):
        for j, setup in enumerate(SETUPS):
            reason = not_applicable(SCENARIOS[name], setup, sqlite=False)
            if reason:
                cells.append(_cell(name, setup, "n/a", reason))
                continue
            status = statuses[(i + j) % len(statuses)]
            if setup != BASELINE and status in ("hazard", "MISSED"):
                status = "clean"
            long = "anomalies: " + ", ".join(f"metric_{k}={k * 1000}" for k in range(12))
            cells.append(_cell(name, setup, status, long))
    return cells


def test_report_fits_80_columns_in_the_worst_case() -> None:
    text = render(_doc(_worst_case()), width=80)
    wide = [line for line in text.splitlines() if len(line) > 80]
    assert wide == []
    rows = [ln for ln in text.splitlines() if ln.split(" ")[0] in SCENARIOS]
    assert [ln.split()[0] for ln in rows] == list(SCENARIOS)  # one row per scenario
    head = next(ln for ln in text.splitlines() if ln.startswith("scenario"))
    assert head.split() == ["scenario", *SETUPS]  # strategies are columns


def test_every_note_is_listed_once_under_the_table() -> None:
    cells = [
        _cell("to-thread", BASELINE, "hazard", "hazard reproduced: stale=10"),
        *[
            _cell("to-thread", s, "n/a", "not a fix here: executor threads")
            for s in ("thread", "greenlet")
        ],
        _cell("to-thread", "auto", "clean", "clean"),
    ]
    text = render(_doc(cells))
    row = next(ln for ln in text.splitlines() if ln.startswith("to-thread"))
    assert row.split()[1:] == ["yes[1]", "n/a[2]", "n/a[2]", "ok"]
    assert text.count("not a fix here: executor threads") == 1
    assert "[1] to-thread / baseline: hazard reproduced: stale=10" in text


def test_markdown_keeps_every_count() -> None:
    cells = [_cell("fork", BASELINE, "hazard", "hazard reproduced: lost=3")]
    cells[0]["metrics"].update(lost=3, dup=0, errors=2)
    md = markdown({"cells": cells})
    assert md.splitlines()[2].startswith("| fork | baseline | hazard ✓ |")


def test_verdict_counts_what_ran() -> None:
    cells = [
        _cell("fork", BASELINE, "hazard", "x"),
        _cell("fork", "auto", "clean", "clean"),
        _cell("fork", "thread", "n/a", "n/a"),
    ]
    ok, why = verdict(cells)
    assert ok
    assert why == "OK: 1 baselines reproduced their hazard; 1 strategy cells had zero anomalies"


# --------------------------------------------------------------------- structure


def _string_constants(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


@pytest.mark.parametrize(
    "module", ["worker.py", "runtimes.py", "matrix.py", "runner.py", "cli.py", "report.py"]
)
def test_no_module_branches_on_a_scenario_name(module: str) -> None:
    """A scenario is one object (stress.scenarios): nothing else names one."""
    assert _string_constants(STRESS / module) & set(SCENARIOS) == set()


def test_one_list_of_strategy_names() -> None:
    from scoping.scopes import STRATEGY_NAMES

    assert STRATEGIES is STRATEGY_NAMES
    for path in STRESS.glob("*.py"):
        assert '"contextvar", "token"' not in path.read_text(), path.name


def test_every_scenario_carries_what_its_cell_needs() -> None:
    from stress.runtimes import RUNTIMES

    for scenario in SCENARIOS.values():
        assert scenario.runtime in RUNTIMES, scenario.name
        assert callable(scenario.naive)
        assert scenario.targets, scenario.name
        assert len(scenario.summary) < 160


def test_a_server_out_of_connections_is_not_blamed_on_scoping() -> None:
    from stress.matrix import server_refused

    metrics = {
        "errors_by_class": {"OperationalError": 16},
        "error_samples": {
            "OperationalError": "(psycopg2.OperationalError) FATAL:  sorry, too many clients "
            "already"
        },
    }
    assert server_refused(metrics) == 16
    assert server_refused({"errors_by_class": {"OperationalError": 3}}) == 0
    cells = [
        _cell("ident-reuse", BASELINE, "hazard", "x"),
        {**_cell("ident-reuse", "thread", "SERVER", "the server refused 16"), "ok": False},
    ]
    ok, why = verdict(cells)
    assert not ok
    assert why.startswith("FAIL: the server refused connections")
    assert "strategies with anomalies" not in why
    row = next(ln for ln in render(_doc(cells)).splitlines() if ln.startswith("ident-reuse"))
    assert row.split()[1:] == ["yes[1]", "SRV[2]"]
