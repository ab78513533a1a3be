"""`python -m order_service`: serve OrderService until SIGTERM/SIGINT."""

from order_service.service import DEFINITION
from servicekit.server import serve
from servicekit.settings import ServiceSettings


def load_settings() -> ServiceSettings:
    return ServiceSettings.from_env("order_service", "ORDER_SERVICE_PORT", default_port=50052)


if __name__ == "__main__":
    serve(DEFINITION, load_settings)
