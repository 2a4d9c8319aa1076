"""Command line: ``python -m scoping [--version] doctor [--json] [--demo]``.

``--version`` prints the distribution name and version (``sqlalchemy-scoping
X.Y.Z``) and exits 0. ``doctor`` diagnoses the process it runs in (plain text,
or ``--json``) and exits 1 when it finds a hazard, else 0. ``doctor --demo``
starts a child process built wrong on purpose and shows the doctor catching
it (:func:`scoping.doctor.run_demo` gives its exit statuses).

The same entry point is installed as the ``scoping`` console script. Nothing
here runs at import time; ``scoping.doctor`` is imported only by ``doctor``.
"""

from __future__ import annotations

import argparse
import shutil
import sys

#: The distribution name on the package index (the import name is ``scoping``).
DISTRIBUTION = "sqlalchemy-scoping"


def version() -> str:
    """The installed version, from the distribution's metadata.

    Falls back to ``scoping.__version__`` (the single source the build reads)
    when the package runs from a checkout that was never installed.
    """
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        import scoping

        return scoping.__version__


def _width() -> int:
    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 100))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scoping",
        description="The right SQLAlchemy Session in the right place: diagnostics.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"{DISTRIBUTION} {version()}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser(
        "doctor",
        help="find Session-scoping hazards in this process",
        description="Diagnose this process; exit 1 when a hazard is found, else 0. "
        "To diagnose your app, call scoping.diagnose() inside it.",
    )
    doctor.add_argument("--json", action="store_true", help="print machine-readable findings")
    doctor.add_argument(
        "--demo",
        action="store_true",
        help="run a process built wrong on purpose and show the doctor catching it "
        "(exit 0 when it is caught)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        from scoping import doctor

        if args.demo:
            return doctor.run_demo(as_json=args.json)
        diagnosis = doctor.diagnose()
        print(diagnosis.to_json() if args.json else diagnosis.format_text(_width()))
        return diagnosis.exit_status
    raise AssertionError(f"unknown command {args.command!r}")  # pragma: no cover - argparse


if __name__ == "__main__":
    sys.exit(main())
