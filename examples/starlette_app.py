"""A Starlette app with one AsyncSession scope per request.

    uvicorn --app-dir examples starlette_app:app --port 8000

The middleware is added the Starlette way, ``Middleware(SessionMiddleware,
Session)``; it is pure ASGI, so contextvars and the request scope reach the
endpoints, ``run_in_threadpool`` and streaming bodies. The Session is closed
after the response has been sent; a failed request is rolled back.

``DATABASE_URL`` selects the database (default: the local ``test`` database).
"""

from __future__ import annotations

import os
import typing as t
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route

from scoping.asgi import RequestScope, SessionMiddleware
from scoping.asyncio import async_scoped_session

if t.TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.requests import Request

DATABASE_URL = make_url(
    os.environ.get("DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1/test")
).set(drivername="postgresql+asyncpg")

engine = create_async_engine(DATABASE_URL)
Session = async_scoped_session(async_sessionmaker(engine), scope=RequestScope())


async def now(request: Request) -> JSONResponse:
    value = await Session.scalar(text("select now()::text"))
    return JSONResponse({"now": value, "session": id(Session())})


async def fail(request: Request) -> JSONResponse:
    await Session.execute(text("select 1"))
    raise RuntimeError("rolled back by the middleware, never committed")


@asynccontextmanager
async def lifespan(_app: Starlette) -> AsyncIterator[None]:
    yield
    await engine.dispose()


app = Starlette(
    routes=[Route("/now", now), Route("/fail", fail)],
    middleware=[Middleware(SessionMiddleware, Session)],
    lifespan=lifespan,
)
