"""Restart a throwaway PostgreSQL cluster in place, mid-run (``--faults``).

Never used on a server this harness did not start: the caller passes the
``Server`` of a ``stress.postgres.throwaway_server()`` block. The postmaster
is restarted with ``pg_ctl restart -m fast`` (every session is cut, as in a
real restart or failover; the same options, port and socket directory), as
the user that owns the data directory. ``stop()`` stops the restarted
postmaster before the throwaway block deletes the directory.
"""

from __future__ import annotations

import os
import subprocess
import time
import typing as t

import stress.postgres as pg


class Restarter:
    """``restart()`` the cluster behind ``server``; ``stop()`` what it started."""

    def __init__(self, server: t.Any) -> None:
        import psycopg2

        conn = psycopg2.connect(server.dsn, connect_timeout=10)
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW data_directory")
                self.datadir = str(t.cast("tuple[str]", cur.fetchone())[0])
        finally:
            conn.close()
        bindir = pg.find_bindir()
        if bindir is None:
            raise RuntimeError("no pg_ctl found to restart the throwaway cluster")
        self.pg_ctl = os.path.join(bindir, "pg_ctl")
        self.uid = os.stat(self.datadir).st_uid
        self.gid = os.stat(self.datadir).st_gid
        self.restarted = False
        self.restarts = 0

    def _run(self, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        options: dict[str, t.Any] = {}
        if os.geteuid() == 0 and self.uid != 0:
            options.update(user=self.uid, group=self.gid, extra_groups=[])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return subprocess.run(
            [self.pg_ctl, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
            cwd=os.path.dirname(self.datadir),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **options,
        )

    def restart(self) -> str:
        """Fast shutdown, then start again with the same options; returns what happened.

        ``pg_ctl restart`` reads the options from ``postmaster.opts``, so the
        port and socket directory stay the same.
        """
        began = time.monotonic()
        log = os.path.join(os.path.dirname(self.datadir), "restarted.log")
        done = self._run("restart", "-D", self.datadir, "-m", "fast", "-l", log, "-w", "-t", "60")
        self.restarted = True
        self.restarts += 1
        if done.returncode != 0:
            return f"restart FAILED: {(done.stderr or done.stdout).strip()[:200]}"
        return f"restarted (fast shutdown) in {time.monotonic() - began:.1f} s"

    def stop(self) -> None:
        if self.restarted:
            self._run("stop", "-D", self.datadir, "-m", "immediate", "-w", "-t", "30")
            self.restarted = False
