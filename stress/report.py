"""Results: the rich table, the JSON document and the verdict."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import sys
import typing as t

from rich.console import Console
from rich.table import Table
from rich.text import Text

PACKAGES = ("sqlalchemy", "gevent", "greenlet", "psycopg2-binary", "psycogreen", "scoping")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        if dist == "psycopg2-binary":
            return _version("psycopg2")
        if dist == "scoping":
            try:
                import scoping

                return str(scoping.__version__)
            except Exception:
                return None
        return None


def environment() -> dict[str, t.Any]:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "executable": sys.executable,
        "versions": {name: _version(name) for name in PACKAGES},
    }


def verdict(cells: t.Sequence[t.Mapping[str, t.Any]]) -> tuple[bool, str]:
    """Exit criterion: every strategy clean and every baseline showing its hazard."""
    bad_strategies = [c for c in cells if c["kind"] == "strategy" and c["ok"] is False]
    missed = [c for c in cells if c["kind"] == "baseline" and c["ok"] is False]
    ran = [c for c in cells if c["ok"] is not None]
    if not ran:
        return False, "FAIL: no cell ran (every selected cell is not applicable)"
    parts = []
    if bad_strategies:
        parts.append(
            "strategies with anomalies: "
            + "; ".join(f"{c['scenario']}/{c['setup']} ({c['reason']})" for c in bad_strategies)
        )
    if missed:
        parts.append(
            "baselines that did not reproduce their hazard: "
            + "; ".join(f"{c['scenario']} ({c['reason']})" for c in missed)
        )
    if parts:
        return False, "FAIL: " + " | ".join(parts)
    n_strat = sum(1 for c in ran if c["kind"] == "strategy")
    n_base = sum(1 for c in ran if c["kind"] == "baseline")
    return True, (
        f"OK: {n_base} baselines reproduced their hazard, {n_strat} strategy cells "
        f"showed zero anomalies"
    )


def document(
    cells: list[dict[str, t.Any]],
    *,
    options: dict[str, t.Any],
    database: dict[str, t.Any],
    notes: list[str],
    argv: list[str],
    started: datetime.datetime,
    elapsed: float,
) -> dict[str, t.Any]:
    ok, reason = verdict(cells)
    return {
        "tool": "python -m stress",
        "argv": argv,
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "environment": environment(),
        "database": database,
        "options": options,
        "notes": notes,
        "cells": cells,
        "verdict": {"ok": ok, "reason": reason},
    }


def write_json(path: str, doc: dict[str, t.Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=False)
        f.write("\n")


def _n(value: t.Any) -> str:
    return "-" if value is None else str(value)


def _count(value: t.Any, expected_bad: bool) -> Text:
    """A count cell: zero is quiet, non-zero is red for a strategy, yellow for a baseline."""
    if value is None:
        return Text("-", style="dim")
    if value == 0:
        return Text("0", style="dim")
    return Text(str(value), style="bold yellow" if expected_bad else "bold red")


def _status(cell: t.Mapping[str, t.Any]) -> Text:
    status = cell["status"]
    styles = {
        "clean": "bold green",
        "hazard": "bold yellow",
        "HANG": "bold yellow" if cell["kind"] == "baseline" else "bold white on red",
        "ANOMALY": "bold white on red",
        "MISSED": "bold white on red",
        "CRASH": "bold white on red",
        "n/a": "dim",
    }
    label = {"clean": "clean", "hazard": "hazard ✓", "HANG": "HANG"}.get(status, status)
    if status == "HANG" and cell["kind"] == "baseline":
        label = "HANG ✓"
    return Text(label, style=styles.get(status, ""))


def table(cells: t.Sequence[t.Mapping[str, t.Any]], title: str) -> Table:
    tab = Table(title=title, header_style="bold", show_lines=False, pad_edge=False)
    for name, justify in (
        ("scenario", "left"),
        ("setup", "left"),
        ("result", "left"),
        ("ok/fail/err", "right"),
        ("stale", "right"),
        ("leaks", "right"),
        ("db x/f", "right"),
        ("lost/dup", "right"),
        ("reg", "right"),
        ("out", "right"),
        ("linger", "right"),
        ("req/s", "right"),
        ("p50/p99 ms", "right"),
        ("errors by class / note", "left"),
    ):
        wrap = name == "errors by class / note"
        tab.add_column(name, justify=t.cast(t.Any, justify), no_wrap=not wrap, overflow="fold")
    last = None
    for c in cells:
        if last is not None and c["scenario"] != last:
            tab.add_section()
        last = c["scenario"]
        base = c["kind"] == "baseline"
        m = c.get("metrics") or {}
        if c["status"] == "n/a":
            tab.add_row(
                c["scenario"],
                c["setup"],
                _status(c),
                *([Text("")] * 10),
                Text("n/a: " + c["reason"], style="dim"),
            )
            continue
        oc = m.get("outcomes", {})
        planned = oc.get("failed", 0) + oc.get("timeout", 0) + oc.get("killed", 0)
        ofe = f"{oc.get('ok', 0)}/{planned}/"
        errs = m.get("errors", 0)
        ofe_t = Text(ofe)
        ofe_t.append(str(errs), style=("bold yellow" if base else "bold red") if errs else "")
        dbx = Text()
        dbx.append_text(_count(m.get("db_cross"), base))
        dbx.append("/")
        dbx.append_text(_count(m.get("db_failed"), base))
        lost = Text()
        lost.append_text(_count(m.get("lost"), base))
        lost.append("/")
        lost.append_text(_count(m.get("dup"), base))
        note = ", ".join(f"{k} {v}" for k, v in (m.get("errors_by_class") or {}).items())
        if c["status"] == "HANG":
            note = (c.get("hang_reason") or "hang") + ("; " + note if note else "")
        elif c["status"] == "CRASH":
            note = "cell crashed; see JSON stderr_tail"
        tab.add_row(
            c["scenario"],
            c["setup"],
            _status(c),
            ofe_t,
            _count(m.get("stale"), base),
            _count(m.get("leaks"), base),
            dbx,
            lost,
            _count(m.get("registry"), base),
            _count(m.get("checkedout"), base),
            _count(m.get("lingering"), base),
            _n(m.get("throughput")),
            f"{_n(m.get('p50_ms'))}/{_n(m.get('p99_ms'))}",
            Text(note, style="yellow" if base else "red") if note else Text(""),
        )
    return tab


def print_report(
    console: Console, cells: t.Sequence[t.Mapping[str, t.Any]], doc: t.Mapping[str, t.Any]
) -> None:
    db = doc["database"]
    title = (
        f"scoping stress: {db.get('masked_url')} "
        f"({db.get('server_version') or db.get('dialect')}), seed {doc['options']['seed']}"
    )
    console.print(table(cells, title))
    console.print(
        "[dim]baseline rows: yellow counts are the hazard the scenario targets (✓ = reproduced); "
        "strategy rows: any red count is an anomaly. leaks = requests that saw another "
        "request's objects; db x/failed = rows committed by another request / rows of "
        "requests that never committed; registry, pool out = Sessions and connections left "
        "at the end; linger = statements still running on the server after their request "
        "ended.[/dim]"
    )
    for note in doc.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}")


def _md_count(value: t.Any) -> str:
    return "-" if value is None else str(value)


def markdown(doc: t.Mapping[str, t.Any]) -> str:
    """The results table as Markdown (for the README and docs/stress.md)."""
    head = (
        "| scenario | setup | result | ok/fail/err | stale | leaks | db x/f | lost/dup "
        "| reg | out | linger | req/s | p50/p99 ms | errors by class / note |"
    )
    lines = [head, "|" + "---|" * 14]
    for c in doc["cells"]:
        m = c.get("metrics") or {}
        if c["status"] == "n/a":
            lines.append(
                f"| {c['scenario']} | {c['setup']} | n/a |  |  |  |  |  |  |  |  |  |  "
                f"| {c['reason']} |"
            )
            continue
        oc = m.get("outcomes", {})
        planned = oc.get("failed", 0) + oc.get("timeout", 0) + oc.get("killed", 0)
        result = c["status"]
        if c["kind"] == "baseline" and c["ok"]:
            result += " ✓"
        elif c["ok"] is False:
            result = f"**{result}**"
        note = ", ".join(f"{k} {v}" for k, v in (m.get("errors_by_class") or {}).items())
        if c["status"] == "HANG":
            note = (c.get("hang_reason") or "hang") + ("; " + note if note else "")
        lines.append(
            f"| {c['scenario']} | {c['setup']} | {result} | {oc.get('ok', 0)}/{planned}/"
            f"{m.get('errors', 0)} | {_md_count(m.get('stale'))} | {_md_count(m.get('leaks'))} "
            f"| {_md_count(m.get('db_cross'))}/{_md_count(m.get('db_failed'))} "
            f"| {_md_count(m.get('lost'))}/{_md_count(m.get('dup'))} "
            f"| {_md_count(m.get('registry'))} | {_md_count(m.get('checkedout'))} "
            f"| {_md_count(m.get('lingering'))} | {_md_count(m.get('throughput'))} "
            f"| {_md_count(m.get('p50_ms'))}/{_md_count(m.get('p99_ms'))} | {note} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        print(markdown(json.load(f)))
