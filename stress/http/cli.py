"""``python -m stress.http``: the app under real gunicorn gevent workers, loaded by Locust.

Exit status: 0 when every naive variant reproduced its hazards and every
scoping variant showed zero anomalies (and, with ``--faults``, recovered);
1 otherwise; 2 for bad arguments (refused before anything runs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import typing as t
from importlib import metadata

from stress.http import run as runner
from stress.http import variants as V

#: Table width: the whole table fits an 80-column terminal.
WIDTH = 80
_DISTS = (
    "SQLAlchemy",
    "gevent",
    "greenlet",
    "gunicorn",
    "locust",
    "Flask",
    "Flask-SQLAlchemy",
    "psycopg2-binary",
    "psycogreen",
)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number above 0")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stress.http",
        description="Serve one Flask app in many variants under gunicorn -k gevent, load each "
        "with Locust and audit every write.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="8 variants (every hazard and strategy once), 6 s each: under 3 minutes",
    )
    p.add_argument(
        "--faults",
        action="store_true",
        help="also run the fault variants while backends are terminated and the "
        "(throwaway) server restarts mid-run",
    )
    p.add_argument("--variants", default="", help="comma-separated variant names (see --list)")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument(
        "--duration",
        type=_positive,
        default=None,
        help="seconds of load per variant (default 20, --quick 6)",
    )
    p.add_argument("--users", type=_count, default=100, help="Locust users (default 100)")
    p.add_argument("--workers", type=_count, default=2, help="gunicorn workers (default 2)")
    p.add_argument(
        "--server",
        choices=("throwaway", "find"),
        default="throwaway",
        help="throwaway: a cluster of our own (default; the run opens up to ~60 "
        "connections); find: --dsn / SCOPING_DSN / compose / local, as "
        "python -m stress does",
    )
    p.add_argument(
        "--dsn",
        default=None,
        help="admin DSN for --server find (prefer the SCOPING_DSN variable: argv "
        "is visible to every local user)",
    )
    p.add_argument(
        "--keep-logs",
        metavar="DIR",
        default=None,
        help="copy each variant's gunicorn and Locust logs to DIR/<variant>/ (created 0700)",
    )
    p.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="write the full results as JSON to PATH ('-' for stdout)",
    )
    return p


def _check_json_target(path: str | None) -> str | None:
    if path is None or path == "-":
        return None
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"--json {path}: directory {directory} does not exist; create it first"
    return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in _DISTS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _fit(value: float, width: int) -> str:
    """A number right-aligned in ``width`` columns: 12345 becomes 12k when it must."""
    text = f"{value:.0f}"
    if len(text) > width:
        text = f"{value / 1000:.0f}k"
    return text[:width].rjust(width)


def _short(name: str) -> str:
    return name.replace("flask-sqlalchemy", "flask-sqla")


def format_table(results: list[dict[str, t.Any]], title: str) -> str:
    """An 80-column table (one row per variant) with the notes listed underneath."""
    head = (
        f"{'variant':<30} {'req/s':>5} {'p50':>4} {'p99':>5} {'errs':>5} {'idle':>4} "
        f"{'ling':>4} {'wto':>3} {'verdict':<10}"
    )
    lines = [title, head, "-" * len(head)]
    notes: list[str] = []
    for r in results:
        if "error" in r:
            lines.append(
                f"{_short(r['variant']):<30} {'-':>5} {'-':>4} {'-':>5} {'-':>5} "
                f"{'-':>4} {'-':>4} {'-':>3} {'FAILED':<10}"
            )
            notes.append(f"{r['variant']}: could not run: {r['error']}")
            continue
        s, a = r["stats"], r["audit"]
        lines.append(
            f"{_short(r['variant']):<30} {_fit(s['rps'], 5)} {_fit(s['p50_ms'], 4)} "
            f"{_fit(s['p99_ms'], 5)} {_fit(a['errors'], 5)} {_fit(r['after']['idle_in_tx'], 4)} "
            f"{_fit(r['probe']['lingering'], 4)} {_fit(r['gunicorn']['worker_timeouts'], 3)} "
            f"{r['verdict'].split(' ')[0]:<10}"
        )
        seen = r["anomalies"] + r["driver_hazards"]
        detail = []
        if seen:
            detail.append("seen " + ",".join(seen))
        if r["expect"]:
            detail.append("expected " + ",".join(r["expect"]))
        if a["lost"] or a["committed_failed"] or a["committed_on_error"]:
            detail.append(
                f"lost {a['lost']}, failed committed {a['committed_failed']}, "
                f"error committed {a['committed_on_error']}"
            )
        if a["unacked"]:
            detail.append(f"unacked {a['unacked']} ({a['unacked_committed']} committed)")
        if r["gunicorn"]["exceptions"]:
            top = list(r["gunicorn"]["exceptions"].items())[:3]
            detail.append("log " + ", ".join(f"{k} {v}" for k, v in top))
        if r["gunicorn"]["doctor_hazards"]:
            detail.append("doctor " + ",".join(r["gunicorn"]["doctor_hazards"]))
        if r.get("recovery"):
            rec = r["recovery"]
            detail.append(
                f"faults: max error window {rec['max_window_s']} s, "
                f"{'recovered' if rec['recovered'] else 'DID NOT RECOVER'}"
            )
        if detail:
            notes.append(f"{r['variant']}: " + "; ".join(detail))
    lines.append("")
    lines.append("req/s, p50/p99 (ms) from Locust; errs: unexpected HTTP answers; idle:")
    lines.append("backends idle in the same transaction 1 s and 2.5 s after the load; ling:")
    lines.append("statements still running 1.5 s after a gevent.Timeout (6 probes); wto:")
    lines.append("gunicorn worker timeouts.")
    if notes:
        lines.append("")
        for note in notes:
            lines.extend(_wrap(note))
    return "\n".join(lines)


def _wrap(text: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, WIDTH, initial_indent="- ", subsequent_indent="  ")


class _Progress:
    """A rich progress bar on a terminal; one line per variant otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.rich: t.Any = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.rich = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.task = self.rich.add_task("starting", total=total)

    def __enter__(self) -> _Progress:
        if self.rich is not None:
            self.rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.rich is not None:
            self.rich.__exit__(*exc)

    def ticker(self, name: str) -> t.Callable[[str, float], None]:
        """A callback for one variant's phases (boot, load, audit)."""
        return lambda phase, seconds: self.phase(name, phase, seconds)

    def phase(self, name: str, phase: str, seconds: float) -> None:
        if self.rich is not None:
            self.rich.update(self.task, description=f"{name[:30]:<30} {phase} {seconds:4.0f}s")

    def finished(self, result: dict[str, t.Any]) -> None:
        self.done += 1
        line = f"[{self.done}/{self.total}] {result['variant']}: {result.get('verdict', 'FAILED')}"
        if "stats" in result:
            line += f" ({result['stats']['rps']:.0f} req/s)"
        if self.rich is not None:
            self.rich.advance(self.task)
            self.rich.console.print(line[:WIDTH])
        else:
            print(line[:WIDTH], file=sys.stderr, flush=True)


def _keep_logs(workdir: str, target: str) -> None:
    os.makedirs(target, mode=0o700, exist_ok=True)
    for name in ("gunicorn.log", "locust.log"):
        with contextlib.suppress(OSError):
            shutil.copy(os.path.join(workdir, name), target)


def _run_set(
    variants: list[V.Variant],
    ctx: runner.Context,
    progress: _Progress,
    first_index: int,
    keep: str | None = None,
) -> list[dict[str, t.Any]]:
    results = []
    for i, variant in enumerate(variants):
        workdir = tempfile.mkdtemp(prefix="stress-http-")  # 0700
        here = dataclasses.replace(ctx, workdir=workdir, on_tick=progress.ticker(variant.name))
        try:
            result = runner.run_variant(variant, first_index + i, here)
        except Exception as exc:  # one broken variant must not hide the others
            result = {
                "variant": variant.name,
                **variant.config(),
                "expect": list(variant.expect),
                "error": f"{type(exc).__name__}: {exc}"[:400],
                "passed": False,
            }
        finally:
            if keep is not None:
                _keep_logs(workdir, os.path.join(keep, variant.name.replace("/", "_")))
            shutil.rmtree(workdir, ignore_errors=True)
        progress.finished(result)
        results.append(result)
    return results


def _choose(args: argparse.Namespace) -> tuple[list[V.Variant], str | None]:
    """The variants to run, or the problem with the flags (refused before anything runs)."""
    problem = _check_json_target(args.json)
    chosen: list[V.Variant] = []
    try:
        if args.variants:
            chosen = V.select(n.strip() for n in args.variants.split(",") if n.strip())
        else:
            chosen = V.quick_variants() if args.quick else V.all_variants()
    except ValueError as exc:
        problem = f"--variants: {exc}"
    if args.variants and not chosen and problem is None:
        problem = "--variants: no variant named; see --list"
    if args.dsn and args.server != "find":
        problem = "--dsn needs --server find (the default starts a throwaway cluster)"
    return chosen, problem


def _execute(
    args: argparse.Namespace,
    chosen: list[V.Variant],
    settings: runner.Settings,
    report: dict[str, t.Any],
) -> None:
    """Start (or find) the server, make the database, run both sets into ``report``."""
    import stress.postgres as pg

    fault_set = [dataclasses.replace(v, expect=()) for v in V.fault_variants()]
    fault_set = fault_set if args.faults else []
    with contextlib.ExitStack() as stack, _Progress(len(chosen) + len(fault_set)) as progress:
        restarters: list[t.Any] = []
        if args.server == "throwaway":
            server = stack.enter_context(pg.throwaway_server())
            # Stop a restarted postmaster after the database is dropped, before the
            # cluster is deleted (ExitStack runs callbacks last in, first out).
            stack.callback(lambda: [r.stop() for r in restarters])
        else:
            server = stack.enter_context(pg.find_server(args.dsn or os.environ.get(pg.ENV_VAR)))
        report["server"] = {"source": server.source, "version": server.version,
                            "dsn": server.masked}  # fmt: skip
        database = stack.enter_context(pg.temporary_database(server, prefix="stress_http"))
        ctx = runner.Context(database=database, workdir="", settings=settings)
        report["results"] = _run_set(chosen, ctx, progress, 0, args.keep_logs)
        if not fault_set:
            return
        if args.server == "throwaway":
            from stress.http.restart import Restarter

            restarter = Restarter(server)
            restarters.append(restarter)
            ctx.restart = restarter.restart
        ctx.settings = dataclasses.replace(
            settings, faults=True, duration=max(settings.duration, 20.0), weights="kill=1"
        )
        report["fault_results"] = _run_set(fault_set, ctx, progress, len(chosen), args.keep_logs)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module doc)."""
    args = parser().parse_args(argv)
    if args.list:
        for v in V.all_variants():
            print(v.name + (f"  (expect: {', '.join(v.expect)})" if v.expect else ""))
        return 0
    chosen, problem = _choose(args)
    if problem:
        print(f"python -m stress.http: {problem}", file=sys.stderr)
        return 2
    duration = args.duration or (6.0 if args.quick else 20.0)
    settings = runner.Settings(users=args.users, duration=duration, workers=args.workers)
    started = time.time()
    words = argv if argv is not None else sys.argv[1:]
    report: dict[str, t.Any] = {
        "command": "python -m stress.http " + " ".join(a for a in words if "://" not in a),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "settings": dataclasses.asdict(settings),
    }
    _execute(args, chosen, settings, report)
    report["elapsed_s"] = round(time.time() - started, 1)
    everything = report["results"] + report.get("fault_results", [])
    report["passed"] = all(r.get("passed") for r in everything)
    print(
        format_table(
            report["results"],
            f"stress.http: {len(chosen)} variant(s), "
            f"{duration:.0f} s of load each, {settings.users} users",
        )
    )
    if "fault_results" in report:
        print()
        print(
            format_table(
                report["fault_results"],
                "Faults: backends terminated, server restarted, kill mid-query",
            )
        )
    print()
    print(
        f"{'PASS' if report['passed'] else 'FAIL'}: naive variants reproduce their hazards; "
        f"scoping shows none ({report['elapsed_s']:.0f} s)."
    )
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return 0 if report["passed"] else 1
