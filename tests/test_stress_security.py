"""No secret leaves the stress harness: not in any process's argv, not in its output or JSON.

The test server trusts its clients and ignores a password it is given, so the
harness is handed a DSN with a password it can use for real; then every
process's command line is captured with ``ps`` while cells run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import typing as t

import pytest
from sqlalchemy.engine import make_url

from stress.childproc import ROOT, child_env

SECRET = "Sup3r-S3cret-h5-pw"


def _with_password(dsn: str, password: str) -> tuple[str, str]:
    """(a DSN carrying a password, the secret to look for).

    A server that already needs a password (a throwaway cluster with SCRAM) keeps
    its own, and that one is what must not leak.
    """
    from stress.postgres.dsn import parse

    own = parse(dsn).secrets
    if own:
        return dsn, own[0]
    if "://" in dsn:
        url = make_url(dsn).set(password=password)
        return url.render_as_string(hide_password=False), password
    return f"{dsn} password={password}", password


def _ps_args() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


@pytest.mark.slow
def test_no_password_in_argv_output_or_json(pg_server: t.Any, tmp_path: t.Any) -> None:
    dsn, secret = _with_password(pg_server.dsn, SECRET)
    report = tmp_path / "run.json"
    env = child_env({"SCOPING_DSN": dsn})  # as in CI: the secret is in no command line
    env.pop("PGPASSWORD", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stress",
            "--scenarios",
            "no-remove",
            "--strategies",
            "auto",
            "--requests",
            "40",
            "--concurrency",
            "4",
            "--json",
            str(report),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    seen_worker = False
    leaks: list[str] = []
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        for line in _ps_args():
            if "stress.worker" in line:
                seen_worker = True
            if secret in line:
                leaks.append(line)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert seen_worker, "no cell was seen running: the capture proves nothing"
    assert leaks == []  # no cell (nor anything else the run started) had it in argv
    assert secret not in out
    assert secret not in err
    text = report.read_text()
    assert secret not in text
    doc = json.loads(text)
    assert "argv" not in doc
    assert "***" in doc["database"]["masked_url"] or secret not in pg_server.dsn


def test_the_worker_reads_its_configuration_from_stdin() -> None:
    """The cell command line is fixed: nothing about the run is in it."""
    from stress import runner

    code = (
        "import json, sys; cfg = json.loads(sys.stdin.read()); "
        "print(json.dumps({'ev': 'ready', 'driver': cfg['url']}), flush=True)"
    )
    run = runner.run_cell(
        {"url": f"postgresql://u:{SECRET}@h/db"},
        stall=5,
        deadline=20,
        command=[sys.executable, "-c", code],
    )
    assert run.driver == f"postgresql://u:{SECRET}@h/db"
    import inspect

    source = inspect.getsource(runner.run_cell)
    assert '[sys.executable, "-m", "stress.worker"]' in source


def test_json_document_has_no_argv_and_masks_cells() -> None:
    import datetime

    from stress.report import document, scrub

    url = f"postgresql+psycopg2://postgres:{SECRET}@127.0.0.1:5432/stress_x"
    cell = {
        "scenario": "fork",
        "setup": "auto",
        "kind": "strategy",
        "status": "clean",
        "ok": True,
        "stderr_tail": f"could not connect to {url}",
        "metrics": {"error_samples": {"OperationalError": f"password={SECRET} failed"}},
    }
    doc = document(
        [scrub(cell, url)],
        options={"seed": 1},
        database={"masked_url": "postgresql+psycopg2://postgres:***@127.0.0.1:5432/stress_x"},
        notes=[],
        started=datetime.datetime.now(datetime.timezone.utc),
    )
    text = json.dumps(doc)
    assert SECRET not in text
    assert "argv" not in doc
