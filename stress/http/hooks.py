"""gunicorn hooks for the ``stress.http`` app: the harness's config file imports them.

Deployed by hand, use this module as the config: ``gunicorn -c
python:stress.http.hooks -k gevent stress.http.app:app`` (docker-compose.yml).

Order inside each gevent worker: ``post_fork`` -> gevent's ``patch_all()``
(``GeventWorker.init_process``) -> the app import (unless ``--preload``
imported it in the master) -> ``post_worker_init``.
"""

from __future__ import annotations

import json
import os
import typing as t


def _config() -> dict[str, t.Any]:
    with open(os.environ["STRESS_HTTP_CONFIG"], encoding="utf-8") as fh:
        return t.cast("dict[str, t.Any]", json.load(fh))


def post_fork(server: t.Any, worker: t.Any) -> None:
    driver = _config()["driver"]
    if driver == "green":
        import scoping.green

        scoping.green.patch_psycopg2()
    elif driver == "psycogreen":
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()


def post_worker_init(worker: t.Any) -> None:
    # Report, never stop the boot: the harness wants to see what each variant does.
    import scoping.doctor

    diagnosis = scoping.doctor.diagnose()
    codes = sorted(f.code for f in diagnosis.hazards)
    worker.log.info("stress-http doctor pid=%d hazards=%s", os.getpid(), ",".join(codes) or "-")
