"""gunicorn settings for examples/wsgi_app.py with gevent workers.

    gunicorn -c examples/gunicorn.conf.py                 # binds 127.0.0.1:8000
    gunicorn -c examples/gunicorn.conf.py -b 127.0.0.1:9000 -w 4

Order inside each worker: ``post_fork`` (below) -> gevent's ``patch_all()``
(GeventWorker.init_process) -> the app import -> ``post_worker_init`` (below).
"""

import os
import typing as t

wsgi_app = "wsgi_app:app"
pythonpath = os.path.dirname(os.path.abspath(__file__))
bind = os.environ.get("BIND", "127.0.0.1:8000")
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_connections = 1000
# Don't build the app (engine, scoped_session) in the master before fork and
# before patch_all().
preload_app = False


def post_fork(server: t.Any, worker: t.Any) -> None:
    # psycopg2 would block the whole worker without a wait callback; this one
    # also cancels the statement on the server when a request is timed out
    # or killed.
    import scoping.green

    scoping.green.patch_psycopg2()


def post_worker_init(worker: t.Any) -> None:
    # gevent is patched and the app is imported: fail the boot on any
    # Session-scoping hazard (a Session shared by greenlets, blocking psycopg2).
    try:
        import scoping.doctor
    except ImportError:  # an older scoping without the doctor
        return
    diagnosis = scoping.doctor.check()
    worker.log.info("scoping doctor: %d finding(s), no hazard", len(diagnosis.findings))
