"""Metrics: every process of the stack serves /metrics, a real Prometheus scrapes them all with
the project's alert rules loaded, and the rules and compose's scrape config pass promtool."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2

from servicekit.server import RunningService
from tests.conftest import REPO
from tests.test_eventing import processor_env
from testsupport.processes import ServiceProcess, free_port, wait_until

ALERTS = REPO / "infra" / "prometheus" / "alerts.yml"
# docker-compose.yml's Prometheus (its targets are checked against the compose file by
# tests/test_compose.py).
COMPOSE_CONFIG = REPO / "infra" / "prometheus" / "prometheus-compose.yml"


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is not installed: run `make tools` (Debian's prometheus package)"
    return found


def test_the_alert_rules_pass_promtool() -> None:
    checked = subprocess.run(
        [tool("promtool"), "check", "rules", str(ALERTS)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_compose_scrape_config_passes_promtool() -> None:
    # Also checks the rule files it loads (alerts.yml, next to it as in the container).
    checked = subprocess.run(
        [tool("promtool"), "check", "config", str(COMPOSE_CONFIG)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 rule files found" in checked.stdout, checked.stdout


def metrics_port_of(process: ServiceProcess) -> int:
    serving = [line for line in process.log_lines if line.get("message") == "serving"]
    return int(str(serving[0]["metrics_port"]))


@pytest.fixture
def metered_processor(order_server: RunningService) -> Iterator[ServiceProcess]:
    process = ServiceProcess("processor", "PROCESSOR_HEALTH_PORT", processor_env(order_server))
    yield process
    process.stop()


def query(prometheus: str, expression: str) -> list[dict[str, object]]:
    url = f"{prometheus}/api/v1/query?query={urllib.parse.quote(expression)}"
    with urllib.request.urlopen(url, timeout=5) as reply:
        result: list[dict[str, object]] = json.load(reply)["data"]["result"]
    return result


def test_prometheus_scrapes_every_process(
    tmp_path: Path,
    user_server: RunningService,
    order_server: RunningService,
    metered_processor: ServiceProcess,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
) -> None:
    orders.ListOrders(orders_pb2.ListOrdersRequest(user_id=user.id))  # a series to find
    targets = {
        "user_service": user_server.metrics.port,
        "order_service": order_server.metrics.port,
        "processor": metrics_port_of(metered_processor),
    }
    jobs = "\n".join(
        f"  - job_name: {job}\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]"
        for job, port in targets.items()
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n"
        f"rule_files: ['{ALERTS}']\nscrape_configs:\n{jobs}\n"
    )
    port = free_port()
    prometheus = subprocess.Popen(
        [
            tool("prometheus"), f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={tmp_path / 'data'}", "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _up_jobs(address) == set(targets), timeout=30, interval=0.5), (
            _up_jobs(address)
        )
        handled = query(address, 'ecommerce_rpc_handled_total{job="order_service"}')
        assert any(
            series["metric"]["method"] == "/ecommerce.v1.OrderService/ListOrders"  # type: ignore[index]
            for series in handled
        )
        assert query(address, "ecommerce_db_pool_connections_in_use")
        assert wait_until(
            lambda: bool(query(address, 'ecommerce_processor_consumer_lag{job="processor"}')),
            timeout=20,
            interval=0.5,
        )
        with urllib.request.urlopen(f"{address}/api/v1/rules", timeout=5) as reply:
            groups = json.load(reply)["data"]["groups"]
        assert {rule["name"] for group in groups for rule in group["rules"]} >= {
            "EcommerceOutboxStuck", "EcommerceTargetDown",
        }  # fmt: skip
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)


def _up_jobs(prometheus: str) -> set[str]:
    try:
        up = query(prometheus, "up == 1")
    except OSError:
        return set()  # not listening yet
    return {str(series["metric"]["job"]) for series in up}  # type: ignore[index]
