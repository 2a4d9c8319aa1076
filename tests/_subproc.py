"""Run a snippet in a fresh interpreter and return the JSON it prints last.

gevent is never patched inside the pytest process; everything that needs
``patch_all()`` runs through here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import typing as t

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(
    code: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    args: t.Sequence[str] = (),
) -> t.Any:
    """Run ``code`` in a subprocess and return the JSON on its last stdout line."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"subprocess printed nothing\n--- stderr\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])
