"""docker-compose.yml cannot run here (no Docker engine), so check that it agrees with the code."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
# Module -> the variable holding its gRPC port (the processor's serves health only) and its default.
SERVICES = {
    "user_service": ("USER_SERVICE_PORT", 50051),
    "order_service": ("ORDER_SERVICE_PORT", 50052),
    "processor": ("PROCESSOR_HEALTH_PORT", 50053),
}
DATABASE_USERS = ("migrate", "user_service", "order_service")


class RecordingEnv(Mapping[str, str]):
    """An empty environment that remembers which variables the settings asked for."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return default

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def variables_read_by(module: str) -> set[str]:
    env = RecordingEnv()
    importlib.import_module(f"{module}.__main__").load_settings(env)
    return env.asked


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return loaded


@pytest.mark.parametrize("module", sorted(SERVICES))
def test_service_runs_its_module_on_its_port(compose: dict[str, Any], module: str) -> None:
    port_variable, default_port = SERVICES[module]
    service = compose["services"][module]
    environment = service["environment"]

    assert service["command"] == ["python", "-m", module]
    assert (REPO / module / "__main__.py").is_file()
    assert set(environment) <= variables_read_by(module), "compose sets a variable nothing reads"
    assert port_variable in variables_read_by(module)
    assert int(environment[port_variable]) == default_port
    # Published on the host's loopback only, unless PUBLISH_HOST says otherwise.
    assert service["ports"] == [f"${{PUBLISH_HOST:-127.0.0.1}}:{default_port}:{default_port}"]
    assert environment["GRPC_LISTEN_HOST"] == "0.0.0.0"  # reachable from outside its container
    assert service["healthcheck"]["test"] == [
        "CMD",
        "python",
        "-m",
        "servicekit.healthcheck",
        f"127.0.0.1:{default_port}",
    ]
    assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert environment["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"


def test_migrate_step_and_database_agree(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    migrate = compose["services"]["migrate"]
    env = postgres["environment"]
    url = (
        f"postgresql+psycopg2://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{env['POSTGRES_DB']}"
    )

    assert migrate["command"] == ["alembic", "upgrade", "head"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in DATABASE_USERS:
        assert compose["services"][name]["environment"]["DATABASE_URL"] == url
    for name in ("user_service", "order_service"):
        depends_on = compose["services"][name]["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully"


def test_kafka_topics_step_and_processor_agree(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]["environment"]
    topics = compose["services"]["topics"]
    processor = compose["services"]["processor"]["environment"]

    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert kafka["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # the topics step creates them
    assert topics["command"] == ["python", "-m", "servicekit.topics"]
    assert topics["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    order_port = compose["services"]["order_service"]["environment"]["ORDER_SERVICE_PORT"]
    assert processor["ORDER_SERVICE_ADDRESS"] == f"order_service:{order_port}"


def test_image_contains_every_package_the_commands_import() -> None:
    copied = {
        source
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    }
    assert {"gen", "servicekit", "migrations", "alembic.ini", *SERVICES} <= copied


@pytest.mark.parametrize("module", sorted(SERVICES))
def test_readme_documents_every_variable(module: str) -> None:
    readme = (REPO / "README.md").read_text()
    for variable in variables_read_by(module):
        assert f"`{variable}`" in readme, f"{variable} is not in the README's configuration table"
