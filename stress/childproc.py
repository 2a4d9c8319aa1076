"""Run a child Python and read the JSON it prints: the one helper for that.

Used by the harness tests (``tests/_subproc.py``) and anything else that needs a
fresh interpreter (gevent patching, a clean import order). Configuration that
may hold a secret (a DSN with a password) goes to the child on **stdin**, never
in its argv, which every local user can read with ``ps``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing as t

__all__ = ["ROOT", "ChildFailed", "child_env", "run_json"]

#: The checkout the ``stress`` package was imported from.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ChildFailed(AssertionError):
    """The child exited non-zero or printed no JSON; the message has its output tails."""


def child_env(extra: t.Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the checkout first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def run_json(
    args: t.Sequence[str],
    *,
    stdin: str | None = None,
    env: t.Mapping[str, str] | None = None,
    timeout: float = 120,
    cwd: str = ROOT,
) -> t.Any:
    """Run ``python ARGS`` and return the JSON on the last non-empty stdout line.

    ``stdin`` is written to the child's standard input (the place for a
    configuration holding a secret). ``env`` is added to this process's
    environment. Raises :class:`ChildFailed` when the child exits non-zero or
    prints nothing, and :class:`subprocess.TimeoutExpired` after ``timeout``.
    """
    proc = subprocess.run(
        [sys.executable, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(env),
        cwd=cwd,
    )
    if proc.returncode != 0:
        raise ChildFailed(
            f"subprocess failed with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise ChildFailed(f"subprocess printed nothing\n--- stderr\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])
