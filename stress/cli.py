"""``python -m stress``: reproduce every scoping race, then show each strategy removes it."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import signal
import sys
import time
import typing as t

from .scenarios import BASELINE, SCENARIOS, SQLITE_LIMITS, STRATEGIES, parse_list

QUICK: dict[str, t.Any] = {"requests": 60, "concurrency": 10, "stall": 4.0, "deadline": 40.0}
FULL: dict[str, t.Any] = {"requests": 400, "concurrency": 20, "stall": 10.0, "deadline": 150.0}


def _epilog() -> str:
    width = max(len(n) for n in SCENARIOS)
    lines = ["scenarios (each run with its naive baseline and every strategy):"]
    lines += [f"  {s.name:<{width}}  {s.summary}" for s in SCENARIOS.values()]
    lines += [
        "",
        "strategies: " + ", ".join(STRATEGIES) + " (scoping.scoped_session(scope=...))",
        "",
        "Every cell runs in its own subprocess, watched from outside: a cell that stops",
        "making progress is reported as HANG with its stack (py-spy, else faulthandler).",
        "Exit status 0 only when every strategy shows zero anomalies and every baseline",
        "shows the hazard its scenario targets; otherwise 1, with the reason last.",
        "",
        "PostgreSQL is found in this order: --dsn, $SCOPING_DSN, docker compose on",
        "127.0.0.1:5433, a local server on 127.0.0.1:5432, a throwaway cluster. SQLite only",
        "with an explicit --dsn sqlite:///PATH (some hazards cannot show there).",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stress",
        description=(
            "Reproduce the Session races SQLAlchemy's docs warn about under gevent, "
            "greenlets and copied contexts, against real PostgreSQL, and show which "
            "scoping strategy removes each one."
        ),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the whole matrix in about a minute (fewer requests; used by CI)",
    )
    p.add_argument(
        "--scenarios",
        metavar="LIST",
        default="all",
        help="comma-separated scenarios to run (default: all)",
    )
    p.add_argument(
        "--strategies",
        metavar="LIST",
        default="all",
        help="comma-separated strategies to run next to each baseline "
        f"(default: all of {','.join(STRATEGIES)})",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help=f"concurrent requests per cell (default {FULL['concurrency']}, "
        f"quick {QUICK['concurrency']})",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--requests",
        type=int,
        metavar="N",
        help=f"requests per cell (default {FULL['requests']}, quick {QUICK['requests']})",
    )
    g.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="run each cell for this long instead of a number of requests",
    )
    p.add_argument(
        "--dsn",
        metavar="DSN",
        help="PostgreSQL DSN or SQLAlchemy URL (a fresh database is created on "
        "that server and dropped), or sqlite:///PATH",
    )
    p.add_argument(
        "--json",
        metavar="PATH",
        dest="json_path",
        help="write every cell, the environment and the options as JSON",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the failure mix: same seed, same planned failures (default 1)",
    )
    p.add_argument(
        "--fail-rate",
        type=float,
        metavar="SHARE",
        help="share of requests that raise after their flush (default per scenario)",
    )
    p.add_argument(
        "--forget-rate",
        type=float,
        metavar="SHARE",
        help="share of requests that never call remove() (default per scenario)",
    )
    p.add_argument(
        "--timeout-rate",
        type=float,
        metavar="SHARE",
        help="share hit by gevent.Timeout mid-statement (default per scenario)",
    )
    p.add_argument(
        "--kill-rate",
        type=float,
        metavar="SHARE",
        help="share killed mid-statement (default per scenario)",
    )
    p.add_argument(
        "--stall",
        type=float,
        metavar="SECONDS",
        help="a cell with no finished request for this long is a HANG "
        f"(default {FULL['stall']:g}, quick {QUICK['stall']:g})",
    )
    return p


def _fail(message: str, code: int = 2) -> t.NoReturn:
    print(f"stress: {message}", file=sys.stderr)
    raise SystemExit(code)


@contextlib.contextmanager
def _database(dsn: str | None) -> t.Iterator[dict[str, t.Any]]:
    if dsn and dsn.startswith("sqlite"):
        if dsn.startswith("sqlite:///:memory:") or dsn in ("sqlite://", "sqlite:///"):
            _fail(
                "an in-memory SQLite database cannot be shared by cell subprocesses; "
                "pass a file: --dsn sqlite:////tmp/stress.db"
            )
        yield {
            "dialect": "sqlite",
            "url": dsn,
            "masked_url": dsn,
            "server_version": None,
            "source": "--dsn",
        }
        return
    from .postgres import PostgresUnavailable, postgres_database

    with contextlib.ExitStack() as stack:
        try:
            db = stack.enter_context(postgres_database(dsn, prefix="stress"))
        except PostgresUnavailable as exc:
            _fail(" ".join(str(exc).split()) if dsn else str(exc))
        yield {
            "dialect": "postgresql",
            "url": db.url,
            "masked_url": db.masked_url,
            "server_version": db.server.version,
            "source": db.server.source,
        }


def _terminate(signum: int, frame: t.Any) -> None:
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the running cell is killed and
    # the throwaway database is dropped.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _terminate)
    try:
        scenarios = parse_list(args.scenarios, list(SCENARIOS), "scenario")
        strategies = parse_list(args.strategies, list(STRATEGIES), "strategy")
    except ValueError as exc:
        _fail(str(exc))
    defaults = QUICK if args.quick else FULL
    for name in ("concurrency", "requests"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _fail(f"--{name} must be at least 1")
    mix = {
        "fail": args.fail_rate,
        "forget": args.forget_rate,
        "timeout": args.timeout_rate,
        "kill": args.kill_rate,
    }
    for k, v in mix.items():
        if v is not None and not 0 <= v <= 1:
            _fail(f"--{k}-rate must be between 0 and 1")

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .matrix import Options, Target, cells, new_run_id, run_one
    from .report import document, print_report, verdict, write_json

    opts = Options(
        scenarios=scenarios,
        setups=[BASELINE, *strategies],
        requests=args.requests or defaults["requests"],
        duration=args.duration,
        concurrency=args.concurrency or defaults["concurrency"],
        seed=args.seed,
        stall=args.stall or defaults["stall"],
        deadline=max(defaults["deadline"], (args.duration or 0) * 3 + 30),
        quick=args.quick,
        mix={k: v for k, v in mix.items() if v is not None} or None,
    )
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)  # a log or a pipe: keep the table readable
    err = Console(stderr=True)
    results: list[dict[str, t.Any]] = []
    with _database(args.dsn) as database:
        target = Target(database["url"])
        notes = []
        if target.dialect == "sqlite":
            notes.append(SQLITE_LIMITS[None])
        err.print(
            f"[bold]stress[/bold]: {database['masked_url']} "
            f"({database.get('server_version') or target.dialect}, {database['source']})"
        )
        todo = cells(opts)
        run_id = new_run_id()
        per_cell = opts.requests if not opts.duration else None
        try:
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err,
                transient=False,
            ) as progress:
                overall = progress.add_task("matrix", total=len(todo))
                for index, (scenario, setup) in enumerate(todo):
                    task = progress.add_task(f"  {scenario.name} / {setup}", total=per_cell)

                    def advance(n: int, task: t.Any = task) -> None:
                        progress.update(task, completed=n)

                    cell = run_one(
                        target,
                        scenario,
                        setup,
                        opts,
                        run_id=run_id,
                        index=index,
                        on_progress=advance,
                    )
                    results.append(cell)
                    progress.update(
                        task,
                        description=f"  {scenario.name} / {setup}: {cell['status']}",
                        completed=per_cell or cell.get("metrics", {}).get("requests", 0),
                        total=per_cell or cell.get("metrics", {}).get("requests", 0),
                        visible=False,
                    )
                    err.print(
                        f"  {scenario.name:<15} {setup:<10} {cell['status']:<8} {cell['reason']}",
                        highlight=False,
                    )
                    progress.advance(overall)
        finally:
            target.dispose()
        doc = document(
            results,
            options=opts.to_json(),
            database={k: v for k, v in database.items() if k != "url"},
            notes=notes,
            argv=["python", "-m", "stress", *(argv if argv is not None else sys.argv[1:])],
            started=started,
            elapsed=time.monotonic() - t0,
        )
    print_report(out, results, doc)
    if args.json_path:
        write_json(args.json_path, doc)
        out.print(f"JSON written to {args.json_path}")
    ok, reason = verdict(results)
    print(reason, flush=True)
    return 0 if ok else 1
