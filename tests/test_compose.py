"""docker-compose.yml provides what stress.postgres and the harness rely on (no Docker needed)."""

from __future__ import annotations

import os
import re
import typing as t
from urllib.parse import urlsplit

import pytest
import yaml

from stress import postgres as pg

COMPOSE_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docker-compose.yml")


@pytest.fixture(scope="module")
def services() -> dict[str, t.Any]:
    with open(COMPOSE_FILE, encoding="utf-8") as fh:
        document = yaml.safe_load(fh)
    assert isinstance(document, dict)
    return t.cast("dict[str, t.Any]", document["services"])


def _seconds(duration: str) -> float:
    """Compose durations such as '2s', '1m30s', '500ms'."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def _command(service: dict[str, t.Any]) -> str:
    command = service["command"]
    return " ".join(command) if isinstance(command, list) else str(command)


def test_service_names(services: dict[str, t.Any]) -> None:
    assert {"postgres", "stress"} <= set(services)


def test_postgres_port_is_loopback_5433(services: dict[str, t.Any]) -> None:
    assert services["postgres"]["ports"] == ["127.0.0.1:5433:5432"]


def test_postgres_image_and_settings(services: dict[str, t.Any]) -> None:
    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:1[67](\.\d+)*", postgres["image"])
    command = _command(postgres)
    assert command.startswith("postgres ")
    assert re.search(r"-c max_connections=(\d+)", command)
    max_connections = int(re.findall(r"-c max_connections=(\d+)", command)[0])
    assert max_connections >= pg.THROWAWAY_MAX_CONNECTIONS
    assert postgres["environment"]["POSTGRES_HOST_AUTH_METHOD"] == "trust"
    assert postgres["tmpfs"] == ["/var/lib/postgresql/data"]


def test_postgres_healthcheck(services: dict[str, t.Any]) -> None:
    check = services["postgres"]["healthcheck"]
    assert check["test"][0] == "CMD"
    assert check["test"][1] == "pg_isready"
    assert _seconds(check["interval"]) <= 5
    assert _seconds(check["timeout"]) <= 5
    assert check["retries"] >= 10


def test_stress_waits_for_healthy_postgres(services: dict[str, t.Any]) -> None:
    stress = services["stress"]
    assert stress["image"] == "python:3.11-slim"
    assert stress["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert any(volume.split(":")[0] == "." for volume in stress["volumes"])
    command = _command(stress)
    assert "pip install" in command
    assert "[stress]" in command
    assert "python -m stress --dsn postgresql://postgres@postgres:5432/postgres" in command


def test_finder_compose_dsn_matches_the_service(services: dict[str, t.Any]) -> None:
    """Step 2 of the finder reaches exactly the published port, user and database."""
    postgres = services["postgres"]
    host_ip, host_port, container_port = postgres["ports"][0].split(":")
    environment = postgres["environment"]
    expected = urlsplit(pg.COMPOSE_DSN)
    assert (expected.hostname, expected.port) == (host_ip, int(host_port))
    assert expected.username == environment["POSTGRES_USER"]
    assert expected.path == "/" + environment["POSTGRES_DB"]
    assert expected.password is None  # trust auth: no password to leak or keep in sync
    assert pg.COMPOSE_DSN == "postgresql://postgres@127.0.0.1:5433/postgres"

    # Inside the compose network the harness uses the service name and container port.
    inside = re.search(r"--dsn (\S+)", _command(services["stress"]))
    assert inside is not None
    url = urlsplit(inside.group(1))
    assert (url.hostname, url.port) == ("postgres", int(container_port))
    assert url.username == environment["POSTGRES_USER"]
    assert url.path == "/" + environment["POSTGRES_DB"]


def test_healthcheck_asks_the_same_user_and_database(services: dict[str, t.Any]) -> None:
    postgres = services["postgres"]
    test = postgres["healthcheck"]["test"]
    assert test[test.index("-U") + 1] == postgres["environment"]["POSTGRES_USER"]
    assert test[test.index("-d") + 1] == postgres["environment"]["POSTGRES_DB"]
    assert test[test.index("-h") + 1] == "127.0.0.1"


# ---- the HTTP load path (docs/http.md)


def test_http_services_exist_behind_a_profile(services: dict[str, t.Any]) -> None:
    for name in ("app", "locust-master", "locust-worker"):
        assert services[name]["profiles"] == ["http"], name  # not started by a plain `up`


def test_locust_worker_is_scalable(services: dict[str, t.Any]) -> None:
    """`docker compose up --scale locust-worker=4` needs no fixed name and no host port."""
    worker = services["locust-worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "--worker" in _command(worker)
    assert "--master-host locust-master" in _command(worker)
    with open(COMPOSE_FILE, encoding="utf-8") as fh:
        header = fh.read().split("services:")[0]
    assert "--scale locust-worker=4" in header


def test_master_and_workers_run_the_repository_locustfile_unchanged(
    services: dict[str, t.Any],
) -> None:
    root = os.path.dirname(COMPOSE_FILE)
    for name in ("locust-master", "locust-worker"):
        service = services[name]
        assert service["image"].startswith("locustio/locust:")
        (volume,) = service["volumes"]
        host, inside, mode = volume.split(":")
        assert mode == "ro"
        assert os.path.isfile(os.path.join(root, host, "locustfile.py"))
        assert f"-f {inside}/locustfile.py" in _command(service)
    master = services["locust-master"]
    assert "--master" in _command(master)
    assert "--host http://app:8000" in _command(master)
    assert master["ports"] == ["127.0.0.1:8089:8089"]  # the UI on loopback only
    assert master["depends_on"] == {"app": {"condition": "service_healthy"}}


def test_app_serves_the_stress_http_app_under_gunicorn_gevent(services: dict[str, t.Any]) -> None:
    app = services["app"]
    command = _command(app)
    assert app["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert "ports" not in app  # reached by Locust inside the compose network only
    assert "exec gunicorn -c python:stress.http.hooks" in command
    assert "-k gevent" in command
    assert "stress.http.app:app" in command
    # The DSN goes through a 0600 file named by STRESS_HTTP_CONFIG, never argv.
    assert "umask 077" in command
    assert "STRESS_HTTP_CONFIG=/tmp/app/config.json" in command
    assert "postgresql+psycopg2://postgres@postgres:5432/postgres" in command
    assert app["healthcheck"]["test"][:2] == ["CMD", "python"]
