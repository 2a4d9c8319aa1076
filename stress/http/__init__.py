"""HTTP load mode: the real servers, the real clients, the audit.

``python -m stress.http`` serves one Flask app (``stress/http/app.py``) in
many variants (Flask-SQLAlchemy; SQLAlchemy's ``scoped_session``; each
``scoping`` strategy; scoping.green, psycogreen or no cooperative driver; with
and without gunicorn ``--preload``) under real ``gunicorn -k gevent`` workers on
127.0.0.1, loads each with Locust (``stress/http/locustfile.py``, headless), and
audits the database against every answer the clients got. See docs/http.md.

Modules: ``variants`` (what runs and what each must show), ``app`` and
``hooks`` (the served app and its gunicorn hooks), ``gunicorn`` (the server
process and its log), ``run`` (one variant: load, probe, audit), ``restart``
(restart a throwaway cluster mid-run), ``cli`` (the command line).
"""
