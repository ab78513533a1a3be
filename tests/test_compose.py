"""docker-compose.yml cannot run here (no Docker engine), so check that it agrees with the code,
and that it keeps the security settings: mutual TLS everywhere, each container its own identity,
no password in the file, ports on loopback unless PUBLISH_HOST says otherwise."""

from __future__ import annotations

import importlib
import importlib.util
import ipaddress
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import make_url

from servicekit.settings import KafkaSettings, TlsSettings, with_password

REPO = Path(__file__).resolve().parent.parent
# Module -> the variable holding its gRPC port (the processor's serves health only) and its default.
SERVICES = {
    "user_service": ("USER_SERVICE_PORT", 50051),
    "order_service": ("ORDER_SERVICE_PORT", 50052),
    "processor": ("PROCESSOR_HEALTH_PORT", 50053),
}
# Compose service -> the identity (certificate) it holds; topics runs as the operator.
IDENTITIES = {
    "user_service": "user_service",
    "order_service": "order_service",
    "processor": "processor",
    "topics": "admin",
}
# Compose service -> the database role it logs in as; migrate runs as the owner.
DATABASE_ROLES = {
    "migrate": "ecommerce",
    "user_service": "user_service",
    "order_service": "order_service",
}
SECRETS = "/run/secrets/"
PUBLISH = "${PUBLISH_HOST:-127.0.0.1}"
SECRETS_GID = "${SECRETS_GID:-1000}"
INIT_SCRIPT = REPO / "infra/postgres/service-roles.sh"
# The containers that run the project's image: the long-running three and the one-off steps.
PROJECT_CONTAINERS = {*SERVICES, "migrate", "topics"}
# What `docker compose stop` waits between SIGTERM and SIGKILL when a service sets nothing.
DOCKER_STOP_GRACE = "10s"
# Three brokers, as `make infra-up KAFKA_BROKERS=3`; every client bootstraps from all of them.
BROKERS = ("kafka-1", "kafka-2", "kafka-3")
BOOTSTRAP = ",".join(f"{broker}:9092" for broker in BROKERS)
PROMETHEUS_CONFIG = REPO / "infra/prometheus/prometheus-compose.yml"
ALERTS = REPO / "infra/prometheus/alerts.yml"
# The server.properties settings that make the cluster durable, as scripts/kafka.sh writes them.
DURABILITY = (
    "num.partitions",
    "default.replication.factor",
    "min.insync.replicas",
    "offsets.topic.replication.factor",
    "transaction.state.log.replication.factor",
    "transaction.state.log.min.isr",
    "share.coordinator.state.topic.replication.factor",
    "share.coordinator.state.topic.min.isr",
    "group.initial.rebalance.delay.ms",
    "auto.create.topics.enable",
)


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


def variables_read_by_topics_step() -> set[str]:
    env = RecordingEnv()
    KafkaSettings.from_env(env, TlsSettings.from_env(env, "admin"))
    return env.asked


def variables_read_by_migrations() -> set[str]:
    env = RecordingEnv()
    with_password("postgresql+psycopg2://ecommerce@postgres:5432/ecommerce", env)
    return {"DATABASE_URL", *env.asked}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return loaded


def unescaped(value: object) -> str:
    """A compose value as the container sees it (`$$` is compose's escape for `$`)."""
    return str(value).replace("$$", "$")


def mounted(service: Mapping[str, Any]) -> dict[str, str]:
    """Container path -> secret name, for the secrets mounted into a service."""
    paths = {}
    for entry in service.get("secrets", []):
        name = entry if isinstance(entry, str) else entry["source"]
        target = name if isinstance(entry, str) else entry.get("target", name)
        paths[target if target.startswith("/") else SECRETS + target] = name
    return paths


def secret_paths_in(environment: Mapping[str, Any]) -> set[str]:
    return {str(v) for v in environment.values() if str(v).startswith(SECRETS)}


def kafka_variable(key: str) -> str:
    """The image's variable for a server.properties key."""
    return "KAFKA_" + key.upper().replace(".", "_")


def local_cluster_properties(tmp_path: Path, node: int = 1) -> dict[str, str]:
    """The server.properties scripts/kafka.sh writes for a node of its three-node cluster: its own
    functions, run in a scratch directory (nothing started)."""
    script = (REPO / "scripts/kafka.sh").read_text()
    helpers = script[script.index("broker_port() {") : script.index("fetch_jars() {")]
    start = script.index("write_config() {")
    write_config = script[start : script.index("\n}\n", start) + 3]
    run = subprocess.run(
        ["bash", "-c", f"{helpers}\n{write_config}\nwrite_config {node}"],
        env={"brokers": "3", "home": str(tmp_path), "certs": "/certs", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return properties((tmp_path / f"node-{node}" / "server.properties").read_text())


def kafka_brokers(compose: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Broker service -> its environment as the container sees it."""
    return {
        name: {key: unescaped(value) for key, value in service["environment"].items()}
        for name, service in compose["services"].items()
        if str(service.get("image", "")).startswith("apache/kafka:")
    }


def properties(text: str) -> dict[str, str]:
    """`key=value` lines of a properties text (here: scripts/kafka.sh's server.properties)."""
    pairs = (line.split("=", 1) for line in text.splitlines() if re.match(r"^[a-z.]+=", line))
    return {key: value.replace("\\$", "$") for key, value in pairs}


# ssl.principal.mapping.rules as Kafka parses them: RULE:regex/replacement/[LU], or DEFAULT.
_KAFKA_RULE = re.compile(r"(DEFAULT|RULE:((?:\\.|[^\\/])*)/((?:\\.|[^\\/])*)/[LU]?)(?:,\s*|$)")


def kafka_principal(rules: str, dn: str) -> str | None:
    """The principal Kafka's rules make of a certificate's subject (RFC 2253), as the broker
    does: the first rule whose pattern matches the whole name; DEFAULT keeps the name."""
    for rule in _KAFKA_RULE.finditer(rules):
        if rule.group(1) == "DEFAULT":
            return dn
        if re.fullmatch(rule.group(2), dn):
            return re.sub(rule.group(2), rule.group(3).replace("$", "\\"), dn)
    return None


def certs_script_outputs() -> set[str]:
    """The files `make certs` writes, by path relative to the repository."""
    script = (REPO / "scripts/certs.sh").read_text()
    identities = re.search(r"^identities=\(([^)]*)\)", script, re.MULTILINE)
    roles = re.search(r"^for role in ([^;]+);", script, re.MULTILINE)
    assert identities and roles, "scripts/certs.sh no longer lists its identities and roles"
    files = {".local/certs/ca.crt", ".local/certs/token-signing.pub"}
    for identity in identities.group(1).split():
        files |= {f".local/certs/{identity}.{ext}" for ext in ("crt", "key", "pem")}
    files |= {f".local/secrets/postgres-{role}.password" for role in roles.group(1).split()}
    return files


def migration_roles() -> set[str]:
    path = REPO / "migrations/versions/0004_least_privilege_roles.py"
    spec = importlib.util.spec_from_file_location("least_privilege_roles", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return set(module.GRANTS)


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
    assert environment["GRPC_LISTEN_HOST"] == "0.0.0.0"  # reachable from outside its container
    # The probe presents the container's own certificate (TLS_*) and dials a name in it.
    assert service["healthcheck"]["test"] == [
        "CMD",
        "python",
        "-m",
        "servicekit.healthcheck",
        f"127.0.0.1:{default_port}",
    ]
    assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert environment["KAFKA_BOOTSTRAP_SERVERS"] == BOOTSTRAP  # any broker may be down


def test_one_off_steps_set_only_what_they_read(compose: dict[str, Any]) -> None:
    topics = compose["services"]["topics"]
    migrate = compose["services"]["migrate"]

    assert topics["command"] == ["python", "-m", "servicekit.topics"]
    assert set(topics["environment"]) <= variables_read_by_topics_step()
    assert migrate["command"] == ["alembic", "upgrade", "head"]
    assert set(migrate["environment"]) <= variables_read_by_migrations()
    # Alembic's environment logs in with the password file, as the services do.
    assert "with_password" in (REPO / "migrations/env.py").read_text()


def test_only_the_grpc_ports_and_prometheus_are_published_and_on_loopback(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    published = {name for name, service in services.items() if service.get("ports")}

    assert published == {*SERVICES, "prometheus"}  # never PostgreSQL, Kafka or /metrics
    for name in SERVICES:
        port = SERVICES[name][1]
        assert services[name]["ports"] == [f"{PUBLISH}:{port}:{port}"]
    assert services["prometheus"]["ports"] == [f"{PUBLISH}:9090:9090"]
    for service in services.values():
        assert service.get("network_mode") != "host"


@pytest.mark.parametrize("name", sorted(IDENTITIES))
def test_each_process_holds_its_own_certificate_and_no_plaintext(
    compose: dict[str, Any], name: str
) -> None:
    identity = IDENTITIES[name]
    service = compose["services"][name]
    environment = service["environment"]
    secrets = mounted(service)

    assert environment["TLS_CA_FILE"] == f"{SECRETS}ca.crt"
    assert environment["TLS_CERT_FILE"] == f"{SECRETS}{identity}.crt"
    assert environment["TLS_KEY_FILE"] == f"{SECRETS}{identity}.key"
    # Whatever a setting names is mounted, and no other identity's key is.
    assert secret_paths_in(environment) <= set(secrets)
    keys = {path for path in secrets if path.endswith((".key", ".pem"))}
    assert keys == {f"{SECRETS}{identity}.key"}
    # Mutual TLS is the default; compose must not turn it off.
    assert environment.get("GRPC_INSECURE", "false") == "false"
    assert str(environment.get("KAFKA_SECURITY_PROTOCOL", "SSL")).upper() == "SSL"


@pytest.mark.parametrize("name", ["user_service", "order_service"])
def test_services_check_tokens_with_the_public_key_only(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]

    assert service["environment"]["AUTH_TOKEN_PUBLIC_KEY_FILE"] == f"{SECRETS}token-signing.pub"
    assert f"{SECRETS}token-signing.pub" in mounted(service)


def test_every_secret_is_a_file_make_certs_writes_and_no_signing_key_is_mounted(
    compose: dict[str, Any],
) -> None:
    files = {name: Path(spec["file"]).as_posix() for name, spec in compose["secrets"].items()}

    assert {path.removeprefix("./") for path in files.values()} <= certs_script_outputs()
    for name, path in files.items():
        assert Path(path).name == name  # mounted under the name `make certs` gave it
        assert name not in {"ca.key", "token-signing.key"}, f"{name} signs: never mount it"
    used = {name for service in compose["services"].values() for name in mounted(service).values()}
    assert used == set(files)


def test_no_password_in_the_compose_file(compose: dict[str, Any]) -> None:
    text = (REPO / "docker-compose.yml").read_text()

    assert not re.search(r"://[^\s/@:]+:[^\s/@]+@", text), "a URL with credentials"
    for service in compose["services"].values():
        for key, value in service.get("environment", {}).items():
            assert not key.endswith(("PASSWORD", "SECRET", "TOKEN")), f"{key}: use a *_FILE setting"
            if key == "DATABASE_URL":
                assert make_url(value).password is None


def test_database_roles_and_password_files(compose: dict[str, Any]) -> None:
    services = compose["services"]
    postgres = services["postgres"]["environment"]

    assert postgres["POSTGRES_USER"] == DATABASE_ROLES["migrate"] == postgres["POSTGRES_DB"]
    assert postgres["POSTGRES_PASSWORD_FILE"] == f"{SECRETS}postgres-ecommerce.password"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, role in DATABASE_ROLES.items():
        service = services[name]
        url = make_url(service["environment"]["DATABASE_URL"])
        assert (url.drivername, url.host, url.port, url.database) == (
            "postgresql+psycopg2",
            "postgres",
            5432,
            postgres["POSTGRES_DB"],
        )
        assert url.username == role
        password_file = f"{SECRETS}postgres-{role}.password"
        assert service["environment"]["DATABASE_PASSWORD_FILE"] == password_file
        assert password_file in mounted(service)
        # No other role's password: a service can log in as itself only.
        assert [p for p in mounted(service) if p.endswith(".password")] == [password_file]
    for name in ("user_service", "order_service"):
        depends_on = services[name]["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully"
    # The processor has no database access at all.
    assert "DATABASE_URL" not in services["processor"]["environment"]
    assert not [p for p in mounted(services["processor"]) if p.endswith(".password")]


def test_postgres_takes_passwords_only_and_creates_the_migrations_roles(
    compose: dict[str, Any],
) -> None:
    postgres = compose["services"]["postgres"]
    environment = postgres["environment"]
    script = INIT_SCRIPT.read_text()

    assert "POSTGRES_PASSWORD" not in environment
    assert environment["POSTGRES_HOST_AUTH_METHOD"] == "scram-sha-256"
    assert set(environment["POSTGRES_INITDB_ARGS"].split()) == {
        "--auth-local=scram-sha-256",
        "--auth-host=scram-sha-256",
    }
    assert "trust" not in " ".join(str(v) for v in environment.values())
    # The init script is mounted where the image runs it, and executable, so it is run (a script
    # that is not is sourced into the entrypoint's own shell).
    mount = f"./{INIT_SCRIPT.relative_to(REPO)}:/docker-entrypoint-initdb.d/{INIT_SCRIPT.name}:ro"
    assert mount in postgres["volumes"]
    assert INIT_SCRIPT.stat().st_mode & 0o111
    # It makes the roles migration 0004 grants to, which are the roles the services log in as,
    # log in with the passwords of the secrets mounted into postgres.
    created = set(re.findall(r"ALTER ROLE (\w+) LOGIN PASSWORD", script))
    assert created == migration_roles() == set(DATABASE_ROLES.values()) - {"ecommerce"}
    assert set(re.findall(r"/run/secrets/[\w.-]+", script)) == {
        f"{SECRETS}postgres-{role}.password" for role in created
    }
    assert set(re.findall(r"/run/secrets/[\w.-]+", script)) <= set(mounted(postgres))
    # Probed over TCP: the image's temporary server during initialisation listens on a socket only.
    assert postgres["healthcheck"]["test"][:4] == ["CMD", "pg_isready", "-h", "127.0.0.1"]


@pytest.mark.parametrize("broker", BROKERS)
def test_kafka_listens_on_mutual_tls_only_as_the_local_broker_does(
    compose: dict[str, Any], broker: str
) -> None:
    kafka = compose["services"][broker]
    env = kafka_brokers(compose)[broker]
    protocols = dict(
        pair.split(":") for pair in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    listeners = [item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")]
    advertised = [item.split("://")[0] for item in env["KAFKA_ADVERTISED_LISTENERS"].split(",")]

    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert env["KAFKA_ADVERTISED_LISTENERS"] == f"BROKER://{broker}:9092"
    for name in [*listeners, *advertised, env["KAFKA_INTER_BROKER_LISTENER_NAME"]]:
        assert protocols[name] == "SSL", f"listener {name} is not TLS"
    assert protocols[env["KAFKA_CONTROLLER_LISTENER_NAMES"]] == "SSL"
    # The image's start script switches to JKS key stores when it sees "SSL://" there.
    assert "SSL://" not in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_SSL_KEYSTORE_TYPE"] == env["KAFKA_SSL_TRUSTSTORE_TYPE"] == "PEM"
    assert env["KAFKA_SSL_KEYSTORE_LOCATION"] == f"{SECRETS}kafka.pem"
    assert env["KAFKA_SSL_TRUSTSTORE_LOCATION"] == f"{SECRETS}ca.crt"
    assert secret_paths_in(env) <= set(mounted(kafka))
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # the topics step creates them
    assert env["KAFKA_LOG_DIRS"] in {volume.split(":")[1] for volume in kafka["volumes"]}
    # The image turns KAFKA_* variables into server.properties, but drops any whose value holds "=".
    assert not [key for key, value in env.items() if key.startswith("KAFKA_") and "=" in value]
    # Client certificates, authorizer and super users as scripts/kafka.sh sets them; principals
    # mapped from the certificate's CN the same way.
    local = properties((REPO / "scripts/kafka.sh").read_text())
    for key in (
        "ssl.client.auth",
        "ssl.endpoint.identification.algorithm",
        "authorizer.class.name",
        "super.users",
        "allow.everyone.if.no.acl.found",
    ):
        assert env[kafka_variable(key)] == local[key], key
    rules = env["KAFKA_SSL_PRINCIPAL_MAPPING_RULES"]
    for identity in ("admin", "kafka", "processor", "user_service"):
        for dn in (f"CN={identity},O=ecommerce", f"CN={identity}"):
            assert kafka_principal(rules, dn) == identity
            assert kafka_principal(local["ssl.principal.mapping.rules"], dn) == identity
    assert env["KAFKA_SSL_CLIENT_AUTH"] == "required"
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    # Its probe is a TLS handshake with the mounted key store, not a plaintext connection, to the
    # name it advertises.
    probe = unescaped(" ".join(kafka["healthcheck"]["test"]))
    assert "security.protocol=SSL" in probe and f"{SECRETS}kafka.pem" in probe
    assert '--bootstrap-server "${KAFKA_ADVERTISED_LISTENERS#BROKER://}"' in probe


def test_three_brokers_form_one_durable_cluster_as_the_local_cluster_does(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    brokers = kafka_brokers(compose)
    local = local_cluster_properties(tmp_path)

    assert set(brokers) == set(BROKERS)
    assert sorted(int(env["KAFKA_NODE_ID"]) for env in brokers.values()) == [1, 2, 3]
    # One cluster, every node a voter of the controller quorum, each on its own volume.
    assert len({env["CLUSTER_ID"] for env in brokers.values()}) == 1
    voters = {f"{env['KAFKA_NODE_ID']}@{name}:9093" for name, env in brokers.items()}
    for name, env in brokers.items():
        assert set(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == voters
        volumes = compose["services"][name]["volumes"]
        assert volumes == [f"{name}-data:{env['KAFKA_LOG_DIRS']}"]
        assert f"{name}-data" in compose["volumes"]
        # Replicated and acknowledged as the local three-node cluster: three replicas of every
        # topic and internal topic (offsets, transactions), two in sync for a write to succeed.
        for key in DURABILITY:
            assert env[kafka_variable(key)] == local[key], (name, key)
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "2"


def test_kafka_clients_and_processor_agree(compose: dict[str, Any]) -> None:
    topics = compose["services"]["topics"]
    processor = compose["services"]["processor"]["environment"]

    assert topics["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == BOOTSTRAP
    assert topics["depends_on"] == {broker: {"condition": "service_healthy"} for broker in BROKERS}
    # The topics step creates the topics with three replicas (and min.insync.replicas=2).
    created = KafkaSettings.from_env(topics["environment"], TlsSettings.from_env({}, "admin"))
    assert created.replication_factor == 3
    assert created.bootstrap_servers.split(",") == [f"{broker}:9092" for broker in BROKERS]
    order_port = compose["services"]["order_service"]["environment"]["ORDER_SERVICE_PORT"]
    assert processor["ORDER_SERVICE_ADDRESS"] == f"order_service:{order_port}"


def test_containers_run_as_non_root_users_that_can_read_their_secrets(
    compose: dict[str, Any],
) -> None:
    dockerfile = (REPO / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    ignored = (REPO / ".dockerignore").read_text().split()

    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert ".local" in ignored  # no key or password in the build context, so none in the image
    for name, service in compose["services"].items():
        assert str(service.get("user", "")).split(":")[0] not in {"root", "0"}, name
        private = [p for p in mounted(service) if p.endswith((".key", ".pem", ".password"))]
        if private:  # 0600 on the host, kept by the bind mount: read through the group
            assert service["group_add"] == [SECRETS_GID], name


def seconds(duration: object) -> float:
    """A compose duration (`30s`, `1m30s`, `1h`, `500ms`, or a bare number of seconds)."""
    text = str(duration)
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", text)
    assert parts and "".join(n + unit for n, unit in parts) == text, f"not a duration: {text!r}"
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    return sum(float(n) * scale[unit] for n, unit in parts)


def drain_seconds(module: str, environment: Mapping[str, Any]) -> float:
    """How long the process may still work after SIGTERM, with compose's settings (or the
    defaults): a service's in-flight RPCs get SHUTDOWN_GRACE_SECONDS; the processor finishes the
    callback attempt in flight (CALLBACK_TIMEOUT_SECONDS), flushes its dead letters (up to 10 s,
    DeadLetterQueue.close) and stops its health server with a grace of 1 s (processor/__main__)."""
    # The password file is mounted only in the container; the drain does not depend on it.
    env = {key: str(value) for key, value in environment.items() if not key.endswith("_FILE")}
    settings = importlib.import_module(f"{module}.__main__").load_settings(env)
    if module == "processor":
        return float(settings.callback_timeout_seconds) + 10.0 + 1.0
    return float(settings.shutdown_grace_seconds)


@pytest.mark.parametrize("module", sorted(SERVICES))
def test_stop_grace_period_outlasts_the_drain(compose: dict[str, Any], module: str) -> None:
    service = compose["services"][module]
    # Docker's default, 10 s, is the services' own drain: SIGKILL would cut its end.
    grace = seconds(service.get("stop_grace_period", DOCKER_STOP_GRACE))

    assert grace > drain_seconds(module, service["environment"])


def test_every_healthcheck_has_a_start_period(compose: dict[str, Any]) -> None:
    services = compose["services"]
    checked = {name: s["healthcheck"] for name, s in services.items() if "healthcheck" in s}

    assert {*SERVICES, "postgres", *BROKERS} <= set(checked)
    for name, healthcheck in checked.items():
        # Failures while the process starts do not count towards `retries`.
        assert seconds(healthcheck["start_period"]) > 0, name
        assert seconds(healthcheck["start_period"]) >= seconds(healthcheck["interval"]), name


def test_the_project_containers_run_one_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    project = PROJECT_CONTAINERS | ({"dlq_replay"} & set(services))
    images = {name: services[name].get("image") for name in project}

    (image,) = set(images.values())  # one name, one build: no container runs a stale copy
    assert image == "ecommerce:${ECOMMERCE_VERSION:-dev}", images
    # Built here, from this Dockerfile, by whichever container compose starts first.
    builds = {name: services[name].get("build") for name in project}
    assert set(map(str, builds.values())) == {"."}, builds
    assert (REPO / "Dockerfile").is_file()
    # Nothing else is built, and no other service runs this image.
    others = {name: s for name, s in services.items() if name not in project}
    assert not [name for name, s in others.items() if "build" in s or s.get("image") == image]


def test_every_container_log_is_rotated(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        logging = service.get("logging")
        assert logging, f"{name} logs without a bound (json-file keeps growing by default)"
        assert logging["driver"] == "json-file", name
        options = logging["options"]
        assert re.fullmatch(r"[1-9]\d*[kmg]", str(options["max-size"])), name
        assert int(options["max-file"]) >= 1, name


def run_certs_script(certs: Path) -> subprocess.CompletedProcess[str]:
    """scripts/certs.sh writing into `certs` (and its passwords into certs/secrets)."""
    paths = {"CERTS_DIR": str(certs), "SECRETS_DIR": str(certs / "secrets")}
    return subprocess.run(
        ["bash", str(REPO / "scripts/certs.sh")],
        env={**paths, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fresh_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `make certs` makes on a clean machine (the developer's own .local/certs may predate a
    name and are kept as they are)."""
    certs = tmp_path_factory.mktemp("certs")
    made = run_certs_script(certs)
    assert made.returncode == 0, made.stderr
    return certs


def certificate_names(certs: Path, identity: str) -> tuple[set[str], set[str]]:
    """The DNS names and IP addresses of a certificate `make certs` made."""
    from cryptography import x509

    path = certs / f"{identity}.crt"
    assert path.is_file(), f"no {path}"
    names = x509.load_pem_x509_certificate(path.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    dns = set(names.value.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)}
    return dns, ips


def test_every_address_dialled_is_a_name_in_the_server_certificate(
    compose: dict[str, Any], fresh_certs: Path
) -> None:
    services = compose["services"]
    dialled = {name: ["127.0.0.1"] for name in SERVICES}  # the health probes
    dialled["order_service"].append(services["processor"]["environment"]["ORDER_SERVICE_ADDRESS"])
    # Every broker presents the kafka certificate: to clients (advertised listeners, bootstrap)
    # and to the other controllers (quorum voters).
    dialled["kafka"] = BOOTSTRAP.split(",")
    for env in kafka_brokers(compose).values():
        dialled["kafka"] += [
            item.split("://")[1] for item in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
        ]
        dialled["kafka"] += [
            voter.split("@")[1] for voter in env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
        ]
    for identity, addresses in dialled.items():
        dns, ips = certificate_names(fresh_certs, identity)
        for address in addresses:
            host = address.rsplit(":", 1)[0] if ":" in address else address
            try:
                assert str(ipaddress.ip_address(host)) in ips, (identity, host)
            except ValueError:
                assert host in dns, (identity, host)


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


def test_make_certs_keeps_an_older_broker_certificate_and_says_how_to_renew_it(
    fresh_certs: Path, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    shutil.copytree(fresh_certs, certs)
    # A broker certificate made before the compose names were added: same key, same CA.
    (certs / "kafka.ext").write_text(
        "subjectAltName=URI:spiffe://ecommerce.local/kafka,DNS:kafka,DNS:localhost,IP:127.0.0.1\n"
    )
    subprocess.run(
        "openssl req -new -key kafka.key -subj /O=ecommerce/CN=kafka |"
        " openssl x509 -req -CA ca.crt -CAkey ca.key -days 1 -extfile kafka.ext -out kafka.crt",
        shell=True, cwd=certs, check=True, capture_output=True,
    )  # fmt: skip
    older = (certs / "kafka.crt").read_bytes()

    again = run_certs_script(certs)

    assert again.returncode == 0, again.stderr
    assert (certs / "kafka.crt").read_bytes() == older  # kept: only `renew` replaces it
    assert "kafka.crt lacks the names kafka-1 kafka-2 kafka-3" in again.stderr
    assert "bash scripts/certs.sh renew" in again.stderr
    # A certificate that has them draws no word.
    assert "lacks" not in run_certs_script(fresh_certs).stderr


@pytest.mark.parametrize("module", sorted(SERVICES))
def test_metrics_listen_on_the_compose_network_unpublished(
    compose: dict[str, Any], module: str
) -> None:
    service = compose["services"][module]
    environment = service["environment"]
    port = int(environment["METRICS_PORT"])

    assert {"METRICS_HOST", "METRICS_PORT"} <= variables_read_by(module)
    assert environment["METRICS_HOST"] == "0.0.0.0"  # reachable from the prometheus container
    assert [str(exposed) for exposed in service["expose"]] == [str(port)]
    assert not [mapping for mapping in service["ports"] if str(port) in mapping.split(":")]


def prometheus_targets() -> dict[str, list[str]]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    return {
        job["job_name"]: [
            target for static in job["static_configs"] for target in static["targets"]
        ]
        for job in config["scrape_configs"]
    }


def test_prometheus_scrapes_every_process_with_the_alert_rules(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    image, tag = prometheus["image"].split(":")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())

    assert image == "prom/prometheus" and re.fullmatch(r"v\d+\.\d+\.\d+", tag)  # pinned
    # Each job (the name the alert rules select on) scrapes its process by its compose name.
    assert prometheus_targets() == {
        name: [f"{name}:{services[name]['environment']['METRICS_PORT']}"] for name in SERVICES
    }
    selected = re.search(r'job=~"([^"]+)"', ALERTS.read_text())
    assert selected, "EcommerceTargetDown no longer selects the jobs"
    alert_jobs = set(re.findall(r"\w+", selected[1]))
    assert alert_jobs == set(SERVICES)
    # The config and the rules it names are mounted where the command points Prometheus.
    mounts = dict(volume.split(":")[:2] for volume in prometheus["volumes"])
    config_path = next(
        arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--config.file=")
    )
    assert mounts[f"./{PROMETHEUS_CONFIG.relative_to(REPO)}"] == config_path
    for rules in config["rule_files"]:
        assert mounts[f"./{ALERTS.relative_to(REPO)}"] == str(Path(config_path).parent / rules)
    assert all(
        volume.endswith(":ro") for volume in prometheus["volumes"] if volume.startswith("./")
    )
    assert not prometheus.get("secrets")  # it holds no key: /metrics is plain HTTP
    assert prometheus["cap_drop"] == ["ALL"]
