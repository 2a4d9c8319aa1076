"""ASGI: one Session scope per request, removed once the response has been sent.

Unit of isolation: the request. :class:`SessionMiddleware` (pure ASGI, not
Starlette's ``BaseHTTPMiddleware``) opens a request scope around the
application, and sessions built with ``scope=RequestScope()`` key their
Session by it::

    from scoping import scoped_session
    from scoping.asgi import RequestScope, SessionMiddleware
    from scoping.asyncio import async_scoped_session

    Session = async_scoped_session(async_sessionmaker(engine), scope=RequestScope())
    SyncSession = scoped_session(sessionmaker(sync_engine), scope=RequestScope())
    app = SessionMiddleware(app, Session, SyncSession)

The request scope lives in a :class:`~contextvars.ContextVar` that holds a
mutable request object, so everything that runs with a *copy* of the
request's context sees the same scope: ``async def`` endpoints, sync
endpoints that Starlette and FastAPI run in a threadpool, ``asyncio.to_thread``
and ``run_in_executor`` calls with a copied context, and the child tasks that
stream a response body. Outside any request (startup code, scripts, tests)
:class:`RequestScope` behaves like its ``fallback`` strategy (``"auto"``).

When the scope ends:

- **Response sent.** When the last body message (``more_body`` false) has
  gone to the server, the request's Sessions are closed (async ones awaited
  on the loop, sync ones in a worker thread): a streaming response can use
  the Session until its last chunk.
- **Background tasks** (Starlette/FastAPI ``BackgroundTasks``, which run
  after the body is sent) get a scope of their own, one per response, closed
  when the application returns.
- **Exceptions, client disconnects, cancellation**: the application's
  ``finally`` path closes whatever scope is current; the error propagates.
  A failed request never commits: closing rolls back.
- **WebSocket**: one scope per connection, closed when it ends.

Lifecycle: a task created inside the request (``create_task`` copies the
context) shares the request's scope while the request runs, and after its
end gets the background scope (or, after that, a scope that is retired with
it). A Session made for a scope that has already ended is retired by the
registry's own cleanup. Fork: nothing is inherited (a request never spans a
fork). An abandoned request (its task destroyed while pending) never reaches
the ``finally`` path; its Sessions stay until ``registry.close_all()``.

Costs per request: one ContextVar set/reset, two small objects and one send
wrapper; a thread hop only when a sync Session was used (to one of four
threads that only close Sessions, never to the loop's default executor,
where a close could wait behind work that waits for a connection). Sessions are not
safe for concurrent use: one request's Session must not be used by two
threads or tasks at the same time (``guard=True`` catches it).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import typing as t

from .scopes import BaseScope, OnEnd, ScopeStrategy, strategy_for

if t.TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, MutableMapping

    Scope = MutableMapping[str, t.Any]
    Message = MutableMapping[str, t.Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]
    ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["RequestScope", "SessionMiddleware", "current_phase"]

log = logging.getLogger(__name__)


class _Phase:
    """A scope key: the request itself, or the background work after its response."""

    __slots__ = ("ended", "label", "watchers")

    def __init__(self, label: str) -> None:
        self.label = label
        self.ended = False
        self.watchers: list[OnEnd] = []

    def end(self) -> None:
        self.ended = True
        watchers, self.watchers = self.watchers, []
        for on_end in watchers:
            on_end(self)

    def __repr__(self) -> str:
        return f"<request scope {self.label}>"


class _Request:
    __slots__ = ("phase",)

    def __init__(self, phase: _Phase) -> None:
        self.phase = phase


_request: contextvars.ContextVar[_Request | None] = contextvars.ContextVar(
    "scoping.asgi.request", default=None
)


def current_phase() -> object | None:
    """The key of the request scope running now, or ``None`` outside any request."""
    request = _request.get()
    return None if request is None else request.phase


class RequestScope(BaseScope):
    """One Session per ASGI request (set by :class:`SessionMiddleware`).

    Unit of isolation: the request, as seen from every copy of its context
    (threadpool, ``to_thread``, child tasks). After the response is sent,
    background work has a scope of its own. Outside any request the
    ``fallback`` strategy decides (``"auto"``: the execution context, so one
    Session per task, thread, greenlet or ``to_thread`` call).

    Cost: one ContextVar read per lookup (plus the fallback's outside a
    request). Cleanup: the middleware closes the Sessions of each scope when
    it ends; a Session made for an ended scope is retired at once.
    """

    __slots__ = ("current", "fallback")
    name = "request"

    def __init__(self, fallback: str | ScopeStrategy = "auto") -> None:
        self.fallback = strategy_for(fallback)
        get = _request.get
        outside = self.fallback.current

        def current() -> t.Hashable:
            request = get()
            if request is None:
                return outside()
            return request.phase

        self.current: t.Callable[[], t.Hashable] = current

    def watch(self, key: t.Hashable, on_end: OnEnd) -> bool:
        if type(key) is _Phase:
            if key.ended:
                on_end(key)
            else:
                key.watchers.append(on_end)
            return True
        return self.fallback.watch(key, on_end)

    def is_ended(self, key: t.Hashable) -> bool:
        if type(key) is _Phase:
            return key.ended
        return self.fallback.is_ended(key)


class SessionMiddleware:
    """Run every HTTP request and WebSocket connection in its own Session scope.

    :param app: the ASGI application.
    :param sessions: the scoped sessions to close at the end of each scope
        (:class:`scoping.scoped_session` or
        :class:`scoping.asyncio.async_scoped_session`), each built with
        ``scope=RequestScope()``.

    See the module documentation for when each scope ends.
    """

    __slots__ = ("_async", "_sync", "app", "sessions")

    def __init__(self, app: ASGIApp, *sessions: t.Any) -> None:
        from .asyncio import async_scoped_session
        from .session import check_removable

        check_removable(sessions, "scoped_session / async_scoped_session")
        for session in sessions:
            if not isinstance(getattr(session, "strategy", None), RequestScope):
                raise TypeError(
                    f"{session!r} is not keyed by the request, so sync endpoints and "
                    "to_thread calls would not see the request's Session: build it with "
                    "scope=scoping.asgi.RequestScope()"
                )
        self.app = app
        self.sessions = sessions
        self._async = tuple(s.registry for s in sessions if isinstance(s, async_scoped_session))
        self._sync = tuple(s.registry for s in sessions if not isinstance(s, async_scoped_session))

    def __repr__(self) -> str:
        return f"<SessionMiddleware {self.app!r} closing {len(self.sessions)} session(s)>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        label = f"{scope.get('method', 'WS')} {scope.get('path', '')}"
        first = _Phase(label)
        request = _Request(first)
        token = _request.set(request)
        try:
            if kind == "http":

                async def send_then_close(message: Message) -> None:
                    await send(message)
                    if (
                        message["type"] == "http.response.body"
                        and not message.get("more_body", False)
                        and request.phase is first
                    ):
                        # The response is complete: what runs now (background
                        # tasks) gets a scope of its own.
                        done, request.phase = request.phase, _Phase(f"{label} (background)")
                        await self._end(done)

                await self.app(scope, receive, send_then_close)
            else:
                await self.app(scope, receive, send)
        finally:
            _request.reset(token)
            await self._end(request.phase)

    async def _end(self, phase: _Phase) -> None:
        """Close the Sessions of ``phase``, then retire any other registry's."""
        from .asyncio import _close_or_retire

        try:
            for registry in self._async:
                session = registry._take(phase)
                if session is not None:
                    await _close_or_retire(registry, session)
            sync = [s for s in (_discard(r, phase) for r in self._sync) if s is not None]
            if sync:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(_closer(), _close_all, sync)
        finally:
            phase.end()


_closer_pool: tuple[int, t.Any] | None = None


def _closer() -> t.Any:
    """The threads that close sync Sessions, made at first use (again after a fork).

    Not the loop's default executor: work queued there (``to_thread`` calls
    waiting for a pooled connection) could wait forever behind the very
    closes that would give connections back. A close never waits for the pool.
    """
    global _closer_pool
    pool = _closer_pool
    if pool is None or pool[0] != os.getpid():
        from concurrent.futures import ThreadPoolExecutor

        pool = _closer_pool = (
            os.getpid(),
            ThreadPoolExecutor(max_workers=4, thread_name_prefix="scoping-asgi-close"),
        )
    return pool[1]


def _discard(registry: t.Any, key: object) -> t.Any:
    return registry._discard(key)


def _close_all(sessions: list[t.Any]) -> None:
    error: BaseException | None = None
    for session in sessions:
        try:
            session.close()
        except BaseException as exc:  # close the others, then raise the first
            error = error or exc
    if error is not None:
        raise error
