"""Command line: ``python -m scoping doctor [--json] [--demo]``.

``doctor`` diagnoses the process it runs in (plain text, or ``--json``) and
exits 1 when it finds a hazard, else 0. ``doctor --demo`` starts a child
process built wrong on purpose and shows the doctor catching it; it exits 0
when the doctor caught every planted hazard, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import typing as t
from pathlib import Path

from scoping.doctor import diagnose

# The planted app: everything here is the usual way to get it wrong.
# Indented source, dedented at use: no line of this module starts with an import
# of gevent or psycopg2 (the project's import-safety check greps for those).
DEMO_APP = textwrap.dedent('''\
    """An app module built wrong on purpose (imported before gevent patches)."""
    import psycopg2  # imported, but no wait callback: queries would block the hub
    import sqlalchemy as sa
    from sqlalchemy import orm

    # Never connects: the doctor needs no database.
    engine = sa.create_engine("postgresql+psycopg2://demo@127.0.0.1:1/demo")
    # Built before gevent.monkey.patch_all(): its threading.local is the native one.
    Session = orm.scoped_session(orm.sessionmaker(bind=engine))
    ''')

# The child: imports the app, then patches (as `gunicorn --preload -k gevent` does).
DEMO_MAIN = textwrap.dedent('''\
    import sys
    import demo_app  # noqa: F401  (builds Session before patching)
    from gevent import monkey
    monkey.patch_all()

    import scoping.doctor
    diagnosis = scoping.doctor.diagnose()
    with open(sys.argv[1], "w") as fh:
        fh.write(diagnosis.to_json())
    print(diagnosis.format_text())
    try:
        scoping.doctor.check()
    except scoping.doctor.UnsafeProcess as exc:
        print()
        print("scoping.doctor.check() raised UnsafeProcess:")
        print(str(exc))
    sys.exit(diagnosis.exit_status)
    ''')

#: (code, subject) of the hazards the demo plants; subject None matches any.
DEMO_EXPECTED: tuple[tuple[str, str | None], ...] = (
    ("scoped_session.shared", "demo_app.Session"),
    ("psycopg2.blocking", None),
)


def _width() -> int:
    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 100))


def run_demo(as_json: bool = False, timeout: float = 120.0) -> int:
    """Run the planted process and check that the doctor catches it.

    Returns 0 when the child's doctor exited 1 and reported every hazard in
    ``DEMO_EXPECTED``, else 1.
    """
    package_root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="scoping-demo-") as tmp:
        Path(tmp, "demo_app.py").write_text(DEMO_APP)
        report = Path(tmp, "diagnosis.json")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [tmp, str(package_root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["COLUMNS"] = str(_width())
        try:
            proc = subprocess.run(
                [sys.executable, "-c", DEMO_MAIN, str(report)], env=env, cwd=tmp,
                capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            print(f"demo: the child process did not finish within {timeout:.0f} s",
                  file=sys.stderr)
            return 1
        diagnosis: dict[str, t.Any] | None = None
        if report.exists() and report.stat().st_size:
            diagnosis = json.loads(report.read_text())
    missing = _missing(diagnosis)
    caught = diagnosis is not None and not missing and proc.returncode == 1
    if as_json:
        print(json.dumps({
            "demo": "SQLAlchemy scoped_session built before gevent.monkey.patch_all(); "
                    "psycopg2 imported without a wait callback",
            "expected": [{"code": c, "subject": s} for c, s in DEMO_EXPECTED],
            "missing": [{"code": c, "subject": s} for c, s in missing],
            "caught": caught,
            "child_exit_status": proc.returncode,
            "diagnosis": diagnosis,
        }, indent=2))
    else:
        print("Demo: a child process imports an app module that builds SQLAlchemy's "
              "scoped_session\nand imports psycopg2, then calls gevent.monkey.patch_all(). "
              "Its doctor says:\n")
        print(proc.stdout.rstrip())
        print()
        if caught:
            print("Demo passed: the doctor caught every planted hazard "
                  f"({', '.join(c for c, _ in DEMO_EXPECTED)}).")
        else:
            names = ", ".join(c for c, _ in missing) or "(exit status)"
            print(f"Demo FAILED: child exit status {proc.returncode}, not caught: {names}")
    if not caught and proc.stderr.strip():
        print(proc.stderr.rstrip(), file=sys.stderr)
    return 0 if caught else 1


def _missing(diagnosis: dict[str, t.Any] | None) -> list[tuple[str, str | None]]:
    if diagnosis is None:
        return list(DEMO_EXPECTED)
    hazards = [(f["code"], f["subject"]) for f in diagnosis["findings"]
               if f["severity"] == "hazard"]
    return [(code, subject) for code, subject in DEMO_EXPECTED
            if not any(c == code and (subject is None or s == subject) for c, s in hazards)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scoping", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser(
        "doctor", help="find Session-scoping hazards in this process",
        description="Diagnose this process; exit 1 when a hazard is found, else 0. "
                    "To diagnose your app, call scoping.diagnose() inside it.")
    doctor.add_argument("--json", action="store_true", help="print machine-readable findings")
    doctor.add_argument(
        "--demo", action="store_true",
        help="run a process built wrong on purpose and show the doctor catching it "
             "(exit 0 when it is caught)")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        if args.demo:
            return run_demo(as_json=args.json)
        diagnosis = diagnose()
        print(diagnosis.to_json() if args.json else diagnosis.format_text(_width()))
        return diagnosis.exit_status
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse exits
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
