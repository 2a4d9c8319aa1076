"""gunicorn settings for the example apps with gevent workers, ``--preload`` included.

    gunicorn -c examples/gunicorn.conf.py                 # wsgi_app:app on 127.0.0.1:8000
    APP=flask_app:app gunicorn -c examples/gunicorn.conf.py -b 127.0.0.1:9000 -w 4
    PRELOAD=0 gunicorn -c examples/gunicorn.conf.py       # import the app in each worker

Order with ``preload_app = True``: the master imports the app (engine,
``scoping.scoped_session``, maybe a warm-up query) *before* gevent patches
anything, then forks; in each worker ``post_fork`` (below) -> gevent's
``patch_all()`` (``GeventWorker.init_process``) -> ``post_worker_init`` (below).
Without preload the app is imported in each worker after ``patch_all()``.

Why ``--preload`` is safe with scoping (docs/prefork.md):

- ``scoping.scoped_session`` decides what "the current greenlet" is when a
  Session is used, never when it is built, so building it in the master
  before ``patch_all()`` still gives one Session per greenlet in the workers;
- a forked worker forgets every Session and pooled connection it inherited,
  without closing them (the master may still use them), and disposes the
  engines its Session factory binds (``scoping.fork``): workers never share
  a connection or a Session with the master or with each other;
- an engine that no ``scoping.scoped_session`` binds (a second engine used
  with plain Sessions) is not known to scoping: dispose it in ``post_fork``
  with ``scoping.fork.dispose_engines(engine)``, or the doctor below stops
  the boot when its pool holds a connection the master opened.
"""

import os
import typing as t

wsgi_app = os.environ.get("APP", "wsgi_app:app")
pythonpath = os.path.dirname(os.path.abspath(__file__))
bind = os.environ.get("BIND", "127.0.0.1:8000")
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_connections = 1000
# Import the app once, in the master: faster boots and copy-on-write memory.
preload_app = os.environ.get("PRELOAD", "1") != "0"


def post_fork(server: t.Any, worker: t.Any) -> None:
    # psycopg2 would block the whole worker without a wait callback; this one
    # also cancels the statement on the server when a request is timed out
    # or killed.
    import scoping.green

    scoping.green.patch_psycopg2()
    # Engines used without scoping.scoped_session: list them here, e.g.
    #   from myapp import reporting_engine
    #   scoping.fork.dispose_engines(reporting_engine)


def post_worker_init(worker: t.Any) -> None:
    # gevent is patched and the app is imported: fail the boot on any
    # Session-scoping hazard (a Session shared by greenlets, blocking psycopg2,
    # a pool holding connections that the master opened).
    import scoping.doctor

    diagnosis = scoping.doctor.check()
    worker.log.info("scoping doctor: %d finding(s), no hazard", len(diagnosis.findings))
