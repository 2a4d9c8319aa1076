"""Results: the 80-column text report, the JSON document, the Markdown table, the verdict."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import sys
import textwrap
import typing as t

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
    server = [c for c in cells if c["status"] == "SERVER"]
    failed = [c for c in cells if c["ok"] is False and c["status"] != "SERVER"]
    bad_strategies = [c for c in failed if c["kind"] == "strategy"]
    missed = [c for c in failed if c["kind"] == "baseline"]
    ran = [c for c in cells if c["ok"] is not None]
    if not ran:
        return False, "FAIL: no cell ran (every selected cell is not applicable)"
    parts = []
    if server:
        parts.append(
            "the server refused connections (too many clients; not a scoping result, rerun "
            "with a lower --concurrency or on a quieter server): "
            + ", ".join(f"{c['scenario']}/{c['setup']}" for c in server)
        )
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
        f"OK: {n_base} baselines reproduced their hazard; {n_strat} strategy cells "
        f"had zero anomalies"
    )


def document(
    cells: list[dict[str, t.Any]],
    *,
    options: dict[str, t.Any],
    database: dict[str, t.Any],
    notes: list[str],
    started: datetime.datetime,
) -> dict[str, t.Any]:
    """The JSON document of a run. It holds no argv and no URL but the masked one."""
    ok, reason = verdict(cells)
    elapsed = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    return {
        "tool": "python -m stress",
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


_T = t.TypeVar("_T")


def scrub(obj: _T, url: str) -> _T:
    """``obj`` (strings, lists, dicts) with every secret of ``url`` masked.

    What a cell sends back (error samples, a stack, the tail of its stderr) may
    quote its connection string; nothing leaves the harness unmasked. Strings go
    through :func:`stress.postgres.scrub`, the PostgreSQL layer's masking.
    """
    if not url.startswith("postgres"):
        return obj  # SQLite: nothing secret in a file path
    from .postgres import scrub as scrub_text

    def clean(value: t.Any) -> t.Any:
        if isinstance(value, str):
            return scrub_text(value, url)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return t.cast(_T, clean(obj))


# --------------------------------------------------------------------- the text report

#: One short code per cell (the notes underneath say why).
CODES = {
    "clean": "ok",
    "hazard": "yes",
    "HANG": "HANG",
    "ANOMALY": "BAD",
    "MISSED": "MISS",
    "CRASH": "CRASH",
    "SERVER": "SRV",
    "n/a": "n/a",
}

LEGEND = (
    "baseline: yes = the naive setup showed its hazard, HANG = it deadlocked (the "
    "hazard too), MISS = it did not (a harness failure). Strategies: ok = zero "
    "anomalies, BAD = anomalies, HANG, CRASH; n/a = not a fix for that hazard. SRV = "
    "the server refused connections (its max_connections, not a scoping result). "
    "Every count of every cell: --json PATH, then python -m stress.report PATH."
)


def _note(cell: t.Mapping[str, t.Any]) -> str | None:
    """Why a cell is what it is, when that is worth a line under the table."""
    status = cell["status"]
    if status == "clean":
        return None
    if status == "n/a":
        return str(cell["reason"])
    reason = str(cell["reason"])
    if status == "HANG":
        reason = (cell.get("hang_reason") or "hang") + "; " + reason
    elif status == "CRASH":
        reason = "cell crashed (stderr_tail in --json); " + reason
    errors = (cell.get("metrics") or {}).get("errors_by_class") or {}
    if errors:
        reason += "; errors: " + ", ".join(f"{k} {v}" for k, v in errors.items())
    return reason


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    return textwrap.wrap(
        text, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False
    )


def render(doc: t.Mapping[str, t.Any], *, width: int = 80) -> str:
    """The results as text no wider than ``width``: one row per scenario, one short
    code per setup (baseline first, then the strategies), the reasons underneath."""
    cells = doc["cells"]
    setups = list(dict.fromkeys(c["setup"] for c in cells))
    scenarios = list(dict.fromkeys(c["scenario"] for c in cells))
    by = {(c["scenario"], c["setup"]): c for c in cells}  # (scenario, setup) -> cell
    first = max(len("scenario"), *(len(s) for s in scenarios))
    widths = [max(len(s), 9) for s in setups]  # "CRASH[12]" fits
    head = f"{'scenario':<{first}}  " + " ".join(
        f"{s:<{w}}" for s, w in zip(setups, widths, strict=True)
    )
    db = doc["database"]
    title = (
        f"scoping stress: {db.get('masked_url')} "
        f"({db.get('server_version') or db.get('dialect')}), seed {doc['options']['seed']}"
    )
    lines = [_clip(title, width), "", _clip(head.rstrip(), width)]
    lines.append("-" * min(width, len(lines[-1])))
    notes: dict[str, int] = {}
    for scenario in scenarios:
        parts = []
        for setup, w in zip(setups, widths, strict=True):
            c = by.get((scenario, setup))
            code = "" if c is None else CODES.get(c["status"], c["status"])
            why = None if c is None else _note(c)
            if c is not None and why is not None:
                key = why if c["status"] == "n/a" else f"{scenario} / {setup}: {why}"
                code += f"[{notes.setdefault(key, len(notes) + 1)}]"
            parts.append(f"{code:<{w}}")
        lines.append(_clip(f"{scenario:<{first}}  " + " ".join(parts).rstrip(), width))
    lines.append("")
    for text, n in notes.items():
        lines += _wrap(text, width, f"[{n}] ", " " * (len(str(n)) + 3))
    lines += ["", *_wrap(LEGEND, width, "", "")]
    for note in doc.get("notes", []):
        lines += _wrap(note, width, "note: ", "      ")
    return "\n".join(lines)


def _clip(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


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
