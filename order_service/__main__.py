"""`python -m order_service`: serve OrderService until SIGTERM/SIGINT."""

from collections.abc import Mapping

from order_service.service import DEFINITION
from servicekit.server import serve
from servicekit.settings import ServiceSettings


def load_settings(env: Mapping[str, str] | None = None) -> ServiceSettings:
    return ServiceSettings.from_env(
        "order_service", "ORDER_SERVICE_PORT", default_port=50052, env=env
    )


if __name__ == "__main__":
    serve(DEFINITION, load_settings)
