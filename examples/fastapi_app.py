"""A FastAPI app with one Session scope per request (async and sync endpoints).

    uvicorn --app-dir examples fastapi_app:app --port 8000

``SessionMiddleware`` (pure ASGI) opens a request scope; both scoped sessions
are built with ``scope=RequestScope()``, so ``async def`` endpoints, sync
endpoints (run in the threadpool), ``asyncio.to_thread`` calls and the body of
a streaming response all see the request's Session. It is closed once the
response has been sent; background tasks get their own.

The dependency recipe: endpoints take the Session as a parameter
(``session: DbSession``); the dependency only hands out the request's
Session, it never closes it (the middleware does, after the body is sent, so
a streaming body can still use it).

``DATABASE_URL`` selects the database (default: the local ``test`` database);
the async engine uses asyncpg, the sync one psycopg2.
"""

from __future__ import annotations

import asyncio
import os
import typing as t
from contextlib import asynccontextmanager

from fastapi import BackgroundTasks, Depends, FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy import String, create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import scoping
from scoping.asgi import RequestScope, SessionMiddleware
from scoping.asyncio import async_scoped_session

if t.TYPE_CHECKING:
    from collections.abc import AsyncIterator

DATABASE_URL = make_url(
    os.environ.get("DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1/test")
)

engine = create_async_engine(DATABASE_URL.set(drivername="postgresql+asyncpg"))
sync_engine = create_engine(DATABASE_URL.set(drivername="postgresql+psycopg2"))

Session = async_scoped_session(
    async_sessionmaker(engine, expire_on_commit=False), scope=RequestScope()
)
SyncSession = scoping.scoped_session(sessionmaker(sync_engine), scope=RequestScope())


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "example_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(200))


async def get_session() -> AsyncSession:
    """The dependency: the request's AsyncSession (closed by the middleware)."""
    return Session()


DbSession = t.Annotated[AsyncSession, Depends(get_session)]


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield
    await engine.dispose()
    sync_engine.dispose()


api = FastAPI(lifespan=lifespan)


@api.post("/notes")
async def add_note(text: str, session: DbSession, tasks: BackgroundTasks) -> dict[str, int]:
    note = Note(text=text)
    session.add(note)
    await session.commit()
    tasks.add_task(audit, note.id)  # runs after the response, in its own scope
    return {"id": note.id}


async def audit(note_id: int) -> None:
    note = await Session.get(Note, note_id)  # the background scope's own Session
    assert note is not None


@api.get("/notes")
def list_notes() -> list[str]:
    # A sync endpoint: FastAPI runs it in the threadpool, in the request's scope.
    return list(SyncSession.scalars(select(Note.text).order_by(Note.id)).all())


@api.get("/notes/count")
async def count_notes() -> dict[str, int]:
    # to_thread copies the context: the thread sees the request's SyncSession.
    texts = await asyncio.to_thread(list_notes)
    return {"count": len(texts)}


@api.get("/notes/stream")
async def stream_notes() -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        # The request's Session is still open while the body streams.
        for text in await Session.scalars(select(Note.text).order_by(Note.id)):
            yield f"{text}\n".encode()

    return StreamingResponse(body(), media_type="text/plain")


app = SessionMiddleware(api, Session, SyncSession)
