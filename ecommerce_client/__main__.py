from ecommerce_client.cli import run

run()
