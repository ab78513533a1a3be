"""The typed client of UserService and OrderService, and the `ecommerce` command line."""

from ecommerce_client.client import EcommerceClient, retry_service_config
from ecommerce_client.errors import CallFailed, RpcFailure

__all__ = ["CallFailed", "EcommerceClient", "RpcFailure", "retry_service_config"]
