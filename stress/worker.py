"""One cell, run inside its own subprocess: ``python -m stress.worker`` with its
configuration as one JSON object on **stdin** (never in argv: the URL may hold a
password, and every local user can read a process's argv).

It builds the cell's runtime (its scenario names it), the registry (the
scenario's naive baseline or a scoping strategy), serves the requests and writes
one JSON object per line on stdout: ``ready``, one ``req`` per finished request
(so a hang still leaves every finished record behind) and ``done`` with the
end-of-cell probe. It never decides whether anything is a hang: the runner
watches it from outside.
"""

from __future__ import annotations

import contextvars
import dataclasses
import faulthandler
import json
import os
import signal
import sys
import time
import typing as t

# Only modules that import neither SQLAlchemy nor gevent: the cell patches first
# (unless its scenario builds the app before patching), then imports the rest.
from .runtimes import RUNTIMES, Cell, emit

if t.TYPE_CHECKING:
    from .app import Setup
    from .runtimes import Runtime
    from .scenarios import Scenario


def _engine(cfg: dict[str, t.Any]) -> t.Any:
    from sqlalchemy import create_engine

    kw: dict[str, t.Any] = {
        "pool_size": cfg["pool_size"],
        "max_overflow": 0,
        "pool_timeout": cfg["pool_timeout"],
    }
    if cfg["dialect"] == "postgresql":
        kw["connect_args"] = {"application_name": cfg["tag"]}
    else:
        kw["connect_args"] = {"timeout": 0.5}
    return create_engine(cfg["url"], **kw)


def _build_async(
    cfg: dict[str, t.Any], scenario: Scenario, token_var: contextvars.ContextVar[str]
) -> tuple[t.Any, t.Any]:
    """An AsyncEngine on asyncpg and the async setup of the cell."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from .aioapp import AsyncScoped
    from .scenarios import BASELINE

    url = make_url(cfg["url"]).set(drivername="postgresql+asyncpg")
    engine = create_async_engine(
        url,
        pool_size=cfg["pool_size"],
        max_overflow=0,
        pool_timeout=cfg["pool_timeout"],
        connect_args={"server_settings": {"application_name": cfg["tag"]}},
    )
    factory = async_sessionmaker(engine, expire_on_commit=True)
    if cfg["setup"] == BASELINE:
        return engine, scenario.naive(factory, token_var)  # type: ignore[arg-type]
    from scoping.asyncio import async_scoped_session

    return engine, AsyncScoped(cfg["setup"], async_scoped_session(factory, scope=cfg["setup"]))


def _build(
    cfg: dict[str, t.Any], scenario: Scenario, token_var: contextvars.ContextVar[str]
) -> tuple[t.Any, Setup]:
    """The engine and the setup (baseline or strategy) of the cell."""
    from sqlalchemy.orm import sessionmaker

    from .app import Scoped
    from .scenarios import BASELINE

    engine = _engine(cfg)
    factory = sessionmaker(bind=engine)
    name = cfg["setup"]
    if name == BASELINE:
        setup = scenario.naive(factory, token_var)
    else:
        import scoping

        setup = Scoped(name, scoping.scoped_session(factory, scope=name))
    # Apps connect once at start-up. It matters: SQLAlchemy runs the dialect's
    # first-connect step under a lock made by threading, and when threading is
    # not patched (raw greenlets, patch_all(thread=False)) two greenlets
    # connecting for the first time at once deadlock the thread.
    engine.connect().close()
    return engine, setup


def _scenario(name: str) -> Scenario:
    from .scenarios import SCENARIOS

    return SCENARIOS[name]


def _prepare(cfg: dict[str, t.Any]) -> tuple[Runtime, Cell, str]:
    """Patch, build and wire the cell in the order its scenario asks for."""
    sqlite = cfg["dialect"] == "sqlite"
    token_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_token")
    runtime = RUNTIMES[cfg["runtime"]]()
    built = None
    if cfg["late_build"]:  # the app (engine, registry) is imported before patching
        built = _build(cfg, _scenario(cfg["scenario"]), token_var)
    runtime.patch()
    scenario = _scenario(cfg["scenario"])
    if built is None and runtime.build_before_driver:
        built = _build(cfg, scenario, token_var)
    driver = "sqlite3" if sqlite else runtime.install_driver(cfg["setup"])
    if runtime.async_engine:
        engine, aio_setup = _build_async(cfg, scenario, token_var)
        return runtime, _async_cell(cfg, runtime, engine, aio_setup, token_var), "asyncpg"
    if built is None:
        built = _build(cfg, scenario, token_var)
    engine, setup = built

    from . import app as appmod

    cell = Cell(cfg=cfg, engine=engine, setup=setup, token_var=token_var)
    cell.app = appmod.App(
        setup=setup,
        model=appmod.make_model(cfg["table"]),
        hooks=runtime.hooks(cfg, sqlite),
        rows=cfg["rows"],
        forget_on_error=scenario.forget_on_error,
    )
    return runtime, cell, driver


def _async_cell(
    cfg: dict[str, t.Any],
    runtime: Runtime,
    engine: t.Any,
    setup: t.Any,
    token_var: contextvars.ContextVar[str],
) -> Cell:
    from . import aioapp
    from .app import make_model

    cell = Cell(cfg=cfg, engine=engine, setup=setup, token_var=token_var)
    runtime.hooks(cfg, sqlite=False)
    cell.aio_app_ = aioapp.AsyncApp(
        setup=setup,
        model=make_model(cfg["table"]),
        tag=cfg["tag"],
        rows=cfg["rows"],
        long_seconds=cfg["long_seconds"],
        forget_on_error=_scenario(cfg["scenario"]).forget_on_error,
        on_long_statement=t.cast(t.Any, runtime).on_long,
    )
    return cell


def _exit_with_the_run(interval: float = 0.5) -> None:
    """End this cell when the run that started it is gone (killed: nobody reads it).

    The cell leads its own session, so a ``kill -9`` of the run's process
    group leaves it behind; it would wait forever, idle in its runtime. An OS
    thread, started before the cell's runtime patches anything (so its sleep
    and thread are the real ones), checks the parent pid twice a second.
    """
    import _thread

    parent = os.getppid()
    sleep = time.sleep

    def watch() -> None:
        while True:
            sleep(interval)
            if os.getppid() != parent:
                os._exit(3)

    _thread.start_new_thread(watch, ())


def main() -> int:
    cfg: dict[str, t.Any] = json.loads(sys.stdin.read())
    _exit_with_the_run()
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    runtime, cell, driver = _prepare(cfg)
    scenario = _scenario(cfg["scenario"])

    import psutil

    from .detectors import Probe

    proc = psutil.Process()
    cell.start()
    emit("ready", driver=driver, pid=os.getpid())
    rss_start = proc.memory_info().rss
    t0 = time.perf_counter()
    if scenario.serve is not None:
        scenario.serve(runtime, cell)
    else:
        runtime.serve(cell)
    elapsed = time.perf_counter() - t0
    runtime.settle()  # cleanup of ended scopes runs, then look at what is left
    registry, checkedout = cell.final or (
        cell.setup.registry_size(),
        cell.engine.pool.checkedout(),
    )
    probe = Probe(
        registry=registry,
        checkedout=checkedout,
        rss_start=rss_start,
        rss_end=proc.memory_info().rss,
        elapsed=elapsed,
        expected=cell.dispatched,
    )
    emit("done", probe=dataclasses.asdict(probe), notes=cell.notes)
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
