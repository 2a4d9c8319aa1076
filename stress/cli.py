"""``python -m stress``: reproduce every scoping race, then show each strategy removes it.

Every option is checked before anything runs: a bad value exits with status 2
and one line naming the fix, and no database is created. SIGTERM and SIGHUP
unwind like Ctrl-C (the running cell is killed, the database dropped, then any
throwaway cluster stopped) and exit with 128 + the signal (143 for SIGTERM,
130 for SIGINT), without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import signal
import sys
import textwrap
import typing as t

from .scenarios import BASELINE, SCENARIOS, SQLITE_NOTE, STRATEGIES, parse_list

QUICK: dict[str, t.Any] = {"requests": 60, "concurrency": 10, "stall": 4.0, "deadline": 40.0}
FULL: dict[str, t.Any] = {"requests": 400, "concurrency": 20, "stall": 10.0, "deadline": 150.0}
WIDTH = 80  # progress lines and the report never go past this


def _epilog() -> str:
    width = max(len(n) for n in SCENARIOS)
    lines = ["scenarios (each run with its naive baseline and every strategy):"]
    for s in SCENARIOS.values():
        wrapped = textwrap.wrap(s.summary, WIDTH - width - 4)
        lines.append(f"  {s.name:<{width}}  {wrapped[0]}")
        lines += [" " * (width + 4) + more for more in wrapped[1:]]
    paragraphs = [
        "strategies: " + ", ".join(STRATEGIES) + " (scoping.scoped_session(factory, scope=NAME))",
        "Every cell runs in its own subprocess, watched from outside: a cell that stops "
        "making progress is reported as HANG with its stack (py-spy, else faulthandler).",
        "Exit status 0 only when every strategy shows zero anomalies and every baseline "
        "shows the hazard its scenario targets; otherwise 1, with the reason last; 2 for "
        "a bad option, 130 on Ctrl-C, 143 on SIGTERM.",
        "PostgreSQL is found in this order: --dsn, $SCOPING_DSN, docker compose on "
        "127.0.0.1:5433, a local server on 127.0.0.1:5432, a throwaway cluster. SQLite "
        "only with an explicit --dsn sqlite:///PATH (some hazards cannot show there).",
        "Run it from the repository checkout: the harness is not part of the wheel.",
    ]
    for text in paragraphs:
        lines += ["", *textwrap.wrap(text, WIDTH)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stress",
        description=textwrap.fill(
            "Reproduce the Session races SQLAlchemy's docs warn about under gevent, "
            "greenlets, threads, fork and asyncio, against real PostgreSQL, and show "
            "which scoping strategy removes each one.",
            WIDTH,
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
        help="write every cell, the environment and the options as JSON (DSN masked)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the failure mix: same seed, same planned failures (default 1)",
    )
    for name, what in (
        ("fail", "raise after their flush"),
        ("forget", "never call remove()"),
        ("timeout", "are hit by gevent.Timeout mid-statement"),
        ("kill", "are killed mid-statement"),
    ):
        p.add_argument(
            f"--{name}-rate",
            type=float,
            metavar="SHARE",
            help=f"share of requests that {what} (default per scenario)",
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


def _check_options(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Refuse bad options before anything runs; return (scenarios, strategies)."""
    try:
        scenarios = parse_list(args.scenarios, list(SCENARIOS), "scenario")
        strategies = parse_list(args.strategies, list(STRATEGIES), "strategy")
    except ValueError as exc:
        _fail(f"{exc} (--scenarios/--strategies)")
    for name in ("concurrency", "requests"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _fail(f"--{name} must be at least 1, not {value}")
    for name in ("duration", "stall"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            _fail(f"--{name} must be a finite number of seconds above 0, not {value:g}")
    for name in ("fail", "forget", "timeout", "kill"):
        value = getattr(args, f"{name}_rate")
        if value is not None and not 0 <= value <= 1:  # nan fails both comparisons
            _fail(f"--{name}-rate must be a share between 0 and 1, not {value:g}")
    if args.json_path:
        folder = os.path.dirname(os.path.abspath(args.json_path))
        if not os.path.isdir(folder):
            _fail(f"--json {args.json_path}: directory {folder} does not exist; create it first")
        if not os.access(folder, os.W_OK):
            _fail(f"--json {args.json_path}: directory {folder} is not writable")
        if os.path.isdir(args.json_path):
            _fail(f"--json {args.json_path} is a directory; give a file name")
    if (
        args.dsn
        and args.dsn.startswith("sqlite")
        and (args.dsn.startswith("sqlite:///:memory:") or args.dsn in ("sqlite://", "sqlite:///"))
    ):
        _fail(
            "an in-memory SQLite database cannot be shared by cell subprocesses; "
            "pass a file: --dsn sqlite:////tmp/stress.db"
        )
    return scenarios, strategies


def connections_per_cell(concurrency: int) -> int:
    """Connections one cell may hold at once on the server.

    The pool (``concurrency + concurrency // 5 + 2``, no overflow), the
    pg_stat_activity monitor, the parent's audit connection and a forked child's
    own connections (two).
    """
    return concurrency + concurrency // 5 + 2 + 1 + 1 + 2


def _check_capacity(server: t.Any, concurrency: int) -> None:
    """Refuse a ``--concurrency`` the server cannot hold, before any database exists."""
    from . import postgres as pg

    needed = connections_per_cell(concurrency)
    try:
        pg.check_connections(server, needed, what=f"--concurrency {concurrency}")
    except pg.TooManyConnections as exc:
        per = needed - concurrency
        fit = max(1, (exc.available - per) * 5 // 6)
        _fail(
            f"--concurrency {concurrency} needs {needed} connections per cell "
            f"({per} besides the requests); use --concurrency {fit} or less, or: "
            + " ".join(str(exc).split()).split("; fix: ", 1)[-1]
        )


@contextlib.contextmanager
def _database(dsn: str | None, concurrency: int) -> t.Iterator[dict[str, t.Any]]:
    if dsn and dsn.startswith("sqlite"):
        yield {"dialect": "sqlite", "url": dsn, "masked_url": dsn, "source": "--dsn"}
        return
    from . import postgres as pg

    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(pg.find_server(dsn))
            _check_capacity(server, concurrency)
            # What earlier runs killed with SIGKILL left on this server and host.
            pg.reap_leftovers(server)
            db = stack.enter_context(pg.temporary_database(server, prefix="stress"))
        except pg.PostgresUnavailable as exc:
            _fail(" ".join(str(exc).split()))
        # Unwinding drops the database first, then stops a throwaway cluster.
        yield {
            "dialect": "postgresql",
            "url": db.url,
            "masked_url": db.masked_url,
            "server_version": db.server.version,
            "source": db.server.source,
        }


def _terminate(signum: int, frame: t.Any) -> None:
    from .postgres import Terminated

    raise Terminated(signum)  # unwinds: cell killed, database dropped, cluster stopped


def _fit(line: str, width: int = WIDTH) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    """Run the matrix; return the exit status (0 OK, 1 a failed verdict)."""
    args = build_parser().parse_args(argv)
    scenarios, strategies = _check_options(args)  # before anything else happens
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _terminate)
    from .postgres import Terminated

    try:
        return _run(args, scenarios, strategies)
    except Terminated as exc:
        print(f"stress: stopped by {signal.Signals(exc.signum).name}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("stress: interrupted", file=sys.stderr)
        return 130


def _options(args: argparse.Namespace, scenarios: list[str], strategies: list[str]) -> t.Any:
    from .matrix import Options

    defaults = QUICK if args.quick else FULL
    mix = {k: getattr(args, f"{k}_rate") for k in ("fail", "forget", "timeout", "kill")}
    stall = args.stall or defaults["stall"]
    return Options(
        scenarios=scenarios,
        setups=[BASELINE, *strategies],
        requests=args.requests or defaults["requests"],
        duration=args.duration,
        concurrency=args.concurrency or defaults["concurrency"],
        seed=args.seed,
        stall=stall,
        deadline=max(defaults["deadline"], (args.duration or 0) * 3 + 30, stall * 3),
        quick=args.quick,
        mix={k: v for k, v in mix.items() if v is not None} or None,
    )


def _run(args: argparse.Namespace, scenarios: list[str], strategies: list[str]) -> int:
    from .matrix import Target, cells, new_run_id, run_one
    from .report import document, render, scrub, verdict, write_json

    opts = _options(args, scenarios, strategies)
    started = datetime.datetime.now(datetime.timezone.utc)
    results: list[dict[str, t.Any]] = []
    with _database(args.dsn, opts.concurrency) as database:
        target = Target(database["url"])
        notes = [SQLITE_NOTE] if target.dialect == "sqlite" else []
        print(
            _fit(
                f"stress: {database['masked_url']} "
                f"({database.get('server_version') or target.dialect}, {database['source']})"
            ),
            file=sys.stderr,
            flush=True,
        )
        todo = cells(opts)
        run_id = new_run_id()
        try:
            for index, (scenario, setup) in enumerate(todo):
                cell = run_one(target, scenario, setup, opts, cell_id=f"{run_id}_{index}")
                results.append(scrub(cell, database["url"]))
                line = f"[{index + 1:>2}/{len(todo)}] {scenario.name} / {setup}: {cell['status']}"
                print(_fit(f"{line} ({cell['reason']})"), file=sys.stderr, flush=True)
        finally:
            target.dispose()
        doc = document(
            results,
            options=opts.to_json(),
            database={k: v for k, v in database.items() if k != "url"},
            notes=notes,
            started=started,
        )
    print(render(doc, width=WIDTH))
    if args.json_path:
        write_json(args.json_path, doc)
        print(_fit(f"JSON written to {args.json_path}", len(args.json_path) + 16))
    ok, reason = verdict(results)
    print("\n".join(textwrap.wrap(reason, WIDTH, subsequent_indent="  ")), flush=True)
    return 0 if ok else 1
