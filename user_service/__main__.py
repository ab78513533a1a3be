"""`python -m user_service`: serve UserService until SIGTERM/SIGINT."""

from collections.abc import Mapping

from servicekit.server import serve
from servicekit.settings import ServiceSettings
from user_service.service import DEFINITION


def load_settings(env: Mapping[str, str] | None = None) -> ServiceSettings:
    return ServiceSettings.from_env(
        "user_service", "USER_SERVICE_PORT", default_port=50051, env=env
    )


if __name__ == "__main__":
    serve(DEFINITION, load_settings)
