"""WSGI middleware that removes scoped Sessions when a request is over.

Unit of isolation: the request. The middleware calls ``remove()`` on every
session it was given once the server is done with the response: after the
response iterable has been consumed and closed, including when the client
disconnects early (the server then calls ``close()``), when the application
raises, and when iterating the body raises. So a streaming response can use
the Session until its last chunk::

    from scoping import scoped_session
    from scoping.wsgi import SessionMiddleware

    Session = scoped_session(sessionmaker(engine), scope="greenlet")
    app = SessionMiddleware(app, Session)

``remove()`` runs in the thread or greenlet that served the request (PEP 3333
servers call ``close()`` there), which is the scope that owns the Session.
When the application raises, the Session is removed at once and the
application's exception propagates; an error raised by ``remove()`` is
logged (logger ``scoping.wsgi``) and never replaces the application's error.

Costs: one wrapper object and one extra Python call per body chunk. A
``wsgi.file_wrapper`` response is not wrapped (that would turn off the
server's ``sendfile``): its ``close`` is replaced on the instance instead.
A server that neither exhausts nor closes the iterable (which PEP 3333
forbids) leaves the Session to scoping's end-of-scope cleanup.

Lifecycle: the middleware holds no per-request state besides the response
wrapper, so a fork (gunicorn ``--preload``) needs nothing from it (the
registries forget what they inherited, see :mod:`scoping.fork`). Work the
request hands to another thread or greenlet gets that unit's own Session,
which this middleware does not remove (the registry closes it when that unit
ends). A request greenlet killed or timed out mid-response still reaches the
server's ``close()`` (gevent's ``pywsgi`` and gunicorn call it from a
``finally``); one that is abandoned without it is cleaned up when its
greenlet ends.
"""

from __future__ import annotations

import logging
import typing as t

if t.TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["Removable", "SessionMiddleware"]

log = logging.getLogger(__name__)


class Removable(t.Protocol):
    """Anything with ``remove()``: a ``scoped_session`` (scoping's or SQLAlchemy's)."""

    def remove(self) -> None: ...


class SessionMiddleware:
    """Remove the given scoped sessions at the end of every request (see the module doc)."""

    __slots__ = ("app", "sessions")

    def __init__(self, app: WSGIApplication, *sessions: Removable) -> None:
        from .session import check_removable

        check_removable(sessions, "scoped_session")
        self.app = app
        self.sessions: tuple[Removable, ...] = sessions

    def __repr__(self) -> str:
        return f"<SessionMiddleware {self.app!r} removing {len(self.sessions)} session(s)>"

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            result = self.app(environ, start_response)
        except BaseException:
            self._remove_after_error()
            raise
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(result, file_wrapper):
            try:
                _close_file_wrapper_then(result, self._remove_all)
            except AttributeError:
                pass  # read-only instance: fall back to wrapping
            else:
                return result
        if isinstance(result, (list, tuple)):
            return _ClosingSequence(result, self._remove_all)
        return _ClosingIterable(result, self._remove_all)

    def _remove_all(self) -> None:
        """Remove every session; raise the first removal error after trying them all."""
        first: BaseException | None = None
        for session in self.sessions:
            try:
                session.remove()
            except BaseException as exc:
                if first is None:
                    first = exc
                else:
                    log.error("removing %r failed too", session, exc_info=exc)
        if first is not None:
            raise first

    def _remove_after_error(self) -> None:
        """Remove every session while an exception propagates: log, never raise."""
        try:
            self._remove_all()
        except BaseException:
            log.exception("removing the scoped session(s) after a failed request failed")


def _close_file_wrapper_then(result: t.Any, after: t.Callable[[], None]) -> None:
    original_close = getattr(result, "close", None)

    def close() -> None:
        _close_then(original_close, after)

    result.close = close


def _close_then(close: t.Callable[[], object] | None, after: t.Callable[[], None]) -> None:
    """Call ``close()`` then ``after()``; an error of ``after`` never masks one of ``close``."""
    try:
        if close is not None:
            close()
    except BaseException:
        try:
            after()
        except BaseException:
            log.exception("removing the scoped session(s) after a failed close() failed")
        raise
    after()


def _quietly(after: t.Callable[[], None]) -> t.Callable[[], None]:
    def quiet() -> None:
        try:
            after()
        except BaseException:
            log.exception("removing the scoped session(s) after a failed response failed")

    return quiet


class _ClosingIterable:
    """The application's response iterable, with the removal run by ``close()``."""

    __slots__ = ("_after", "_closed", "_failed", "_iterator", "_result")

    def __init__(self, result: Iterable[bytes], after: t.Callable[[], None]) -> None:
        self._result = result
        self._after = after
        self._iterator: Iterator[bytes] | None = None
        self._closed = False
        self._failed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            if self._iterator is None:
                self._iterator = iter(self._result)
            return next(self._iterator)
        except StopIteration:
            raise
        except BaseException:
            # The server calls close() while handling this error: from then on
            # a removal error is logged, not raised over this one.
            self._failed = True
            raise

    def close(self) -> None:
        """Close the application's iterable, then remove the sessions (once)."""
        if self._closed:
            return
        self._closed = True
        after = self._after
        if self._failed:
            after = _quietly(after)
        _close_then(getattr(self._result, "close", None), after)


class _ClosingSequence(_ClosingIterable):
    """A list or tuple body: keeps ``len()`` so servers can set Content-Length."""

    __slots__ = ()

    _result: list[bytes] | tuple[bytes, ...]

    def __len__(self) -> int:
        return len(self._result)
