"""Run a snippet in a fresh interpreter and return the JSON it prints last.

gevent is never patched inside the pytest process; everything that needs
``patch_all()`` runs through here. The work is done by :func:`stress.childproc.run_json`,
the project's one "run a child Python, read its JSON" helper.
"""

from __future__ import annotations

import textwrap
import typing as t

from stress.childproc import ROOT, run_json

__all__ = ["ROOT", "run_python"]


def run_python(
    code: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    args: t.Sequence[str] = (),
    stdin: str | None = None,
) -> t.Any:
    """Run ``code`` in a subprocess and return the JSON on its last stdout line."""
    return run_json(["-c", textwrap.dedent(code), *args], env=env, timeout=timeout, stdin=stdin)
