"""Serve an example app with gevent.pywsgi: ``python examples/serve_gevent.py wsgi_app 8000``.

The order is the point: ``patch_all()`` first, then ``patch_psycopg2()``, then
the app import (which builds the engine and the scoped_session).
"""

from gevent import monkey

monkey.patch_all()

# ruff: noqa: E402  (everything below must come after patch_all)
import importlib
import sys

from gevent.pywsgi import WSGIServer

import scoping.green

scoping.green.patch_psycopg2()


def main() -> None:
    module_name, port = sys.argv[1], int(sys.argv[2])
    app = importlib.import_module(module_name).app
    server = WSGIServer(("127.0.0.1", port), app, log=None)
    server.serve_forever()


if __name__ == "__main__":
    main()
