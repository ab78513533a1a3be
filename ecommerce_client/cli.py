"""`ecommerce`: UserService and OrderService from a shell, through EcommerceClient."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path

from ecommerce.v1 import orders_pb2, users_pb2

from ecommerce_client.client import DEFAULT_DEADLINE_SECONDS, EcommerceClient
from ecommerce_client.errors import CallFailed
from ecommerce_client.money import parse_amount
from ecommerce_client.output import Printer
from servicekit.settings import SettingsError, TlsSettings

PROGRAM = "ecommerce"
DEFAULT_USERS_ADDRESS = "localhost:50051"
DEFAULT_ORDERS_ADDRESS = "localhost:50052"
IDENTITY = "client"  # the certificate presented: CERTS_DIR/client.crt and .key by default

EXIT_CALL_FAILED = 1  # the server answered with an error status
EXIT_USAGE = 2  # bad arguments or settings, as argparse's own

MAIN_DESCRIPTION = """\
Call UserService and OrderService over mutual TLS with a bearer token.

Every call presents the client certificate (CERTS_DIR/client.crt and .key, signed by
CERTS_DIR/ca.crt; `make certs` writes them) and a token (`make -s token SUB=<user id>
SCOPE=user`, or SCOPE=admin). Options may come before or after the command."""

MAIN_EPILOG = """\
environment (a flag wins over its variable):
  ECOMMERCE_USERS_ADDRESS   UserService's host:port (default localhost:50051)
  ECOMMERCE_ORDERS_ADDRESS  OrderService's host:port (default localhost:50052)
  ECOMMERCE_TOKEN           the bearer token (or --token-file)
  CERTS_DIR                 where ca.crt, client.crt and client.key are (default .local/certs)
  TLS_CA_FILE, TLS_CERT_FILE, TLS_KEY_FILE   each file on its own
  GRPC_INSECURE=true        plaintext, to a loopback address only

examples:
  export ECOMMERCE_TOKEN=$(make -s token SUB=ops SCOPE=admin)
  ecommerce users create --email ada@example.com --name "Ada Lovelace"
  ecommerce orders create --user-id <user id> --amount 19.99 --currency USD
  ecommerce orders watch <order id>          # each change until the order is final
  ecommerce --output json orders list --user-id <user id> --all

exit status: 0 on success, 1 when the server answers with an error (code, reason, message and
field violations on stderr), 2 for bad arguments or settings."""

Command = Callable[[EcommerceClient, argparse.Namespace, Printer], None]


def users_create(client: EcommerceClient, args: argparse.Namespace, printer: Printer) -> None:
    printer.resource(client.create_user(args.email, args.name, args.request_id))


def users_get(client: EcommerceClient, args: argparse.Namespace, printer: Printer) -> None:
    printer.resource(client.get_user(args.id))


def users_list(client: EcommerceClient, args: argparse.Namespace, printer: Printer) -> None:
    if args.all:
        printer.stream(users_pb2.User, client.iter_users(args.page_size))
        return
    page = client.list_users(args.page_size, args.page_token)
    printer.page(page, page.users, users_pb2.User)
    next_page_hint(printer, page.next_page_token)


def orders_create(client: EcommerceClient, args: argparse.Namespace, printer: Printer) -> None:
    order = client.create_order(args.user_id, args.amount, args.currency, args.request_id)
    printer.resource(order)


def orders_get(client: EcommerceClient, args: argparse.Namespace, printer: Printer) -> None:
    printer.resource(client.get_order(args.id))


def orders_list(client: EcommerceClient, args: argparse.Namespace, printer: Printer) -> None:
    if args.all:
        printer.stream(orders_pb2.Order, client.iter_orders(args.user_id, args.page_size))
        return
    page = client.list_orders(args.user_id, args.page_size, args.page_token)
    printer.page(page, page.orders, orders_pb2.Order)
    next_page_hint(printer, page.next_page_token)


def orders_watch(client: EcommerceClient, args: argparse.Namespace, printer: Printer) -> None:
    printer.stream(orders_pb2.Order, client.watch_order(args.id, args.timeout))


def orders_cancel(client: EcommerceClient, args: argparse.Namespace, printer: Printer) -> None:
    printer.resource(client.cancel_order(args.id, args.reason))


def next_page_hint(printer: Printer, next_page_token: str) -> None:
    """As a table, where the next page is (on stderr: stdout stays the rows)."""
    if next_page_token and printer.output == "table":
        print(f"more: --page-token {next_page_token}", file=sys.stderr)


def amount(text: str) -> Decimal:
    try:
        return parse_amount(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def page_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def add_global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The connection and output options, on the program and again on every command (there
    with no defaults, so that one given before the command is kept)."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    connection = parser.add_argument_group("connection (flags win over the environment)")
    connection.add_argument(
        "--users-address",
        default=default(None),
        metavar="HOST:PORT",
        help=f"UserService (ECOMMERCE_USERS_ADDRESS; default {DEFAULT_USERS_ADDRESS})",
    )
    connection.add_argument(
        "--orders-address",
        default=default(None),
        metavar="HOST:PORT",
        help=f"OrderService (ECOMMERCE_ORDERS_ADDRESS; default {DEFAULT_ORDERS_ADDRESS})",
    )
    connection.add_argument(
        "--token",
        default=default(None),
        help="the bearer token (ECOMMERCE_TOKEN; a flag shows in `ps`, the variable does not)",
    )
    connection.add_argument(
        "--token-file", default=default(None), metavar="PATH", help="read the token from a file"
    )
    connection.add_argument(
        "--certs-dir",
        default=default(None),
        metavar="DIR",
        help="ca.crt, client.crt and client.key (CERTS_DIR; default .local/certs)",
    )
    connection.add_argument(
        "--ca-file", default=default(None), metavar="PATH", help="the CA (TLS_CA_FILE)"
    )
    connection.add_argument(
        "--cert-file",
        default=default(None),
        metavar="PATH",
        help="the client certificate (TLS_CERT_FILE)",
    )
    connection.add_argument(
        "--key-file", default=default(None), metavar="PATH", help="its key (TLS_KEY_FILE)"
    )
    connection.add_argument(
        "--deadline",
        type=positive_seconds,
        default=default(DEFAULT_DEADLINE_SECONDS),
        metavar="SECONDS",
        help=f"each call's deadline, retries included (default {DEFAULT_DEADLINE_SECONDS:g};"
        " a watch has none unless given --timeout)",
    )
    parser.add_argument(
        "--output",
        "-o",
        choices=("table", "json"),
        default=default("table"),
        help="table: aligned columns (default); json: protobuf JSON, one object per line",
    )


def add_command(
    group: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    run: Command,
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    parser = group.add_parser(
        name,
        help=summary,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run)
    return parser


def add_paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--page-size", type=page_size, default=0, help="at most this many (0: the server's default)"
    )
    parser.add_argument("--page-token", default="", help="the page after the one that gave it")
    parser.add_argument(
        "--all", action="store_true", help="every page, one after another (one object per line)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description=MAIN_DESCRIPTION,
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_options(parser, suppress=False)
    services = parser.add_subparsers(title="services", dest="service", required=True)

    users = services.add_parser(
        "users", help="UserService: create, get, list", description="UserService's users."
    ).add_subparsers(title="commands", dest="command", required=True)
    create = add_command(
        users,
        "create",
        users_create,
        "create a user (admin)",
        "Create a user; needs an admin token. Prints the user, with its id.\n\n"
        "  ecommerce users create --email ada@example.com --name 'Ada Lovelace'",
    )
    create.add_argument("--email", required=True)
    create.add_argument("--name", required=True)
    create.add_argument(
        "--request-id",
        help="a UUID: the same one again returns the same user (default: a fresh one)",
    )
    get = add_command(
        users, "get", users_get, "a user by id", "Print a user: yours (user token) or any (admin)."
    )
    get.add_argument("id", help="the user's id")
    listing = add_command(
        users,
        "list",
        users_list,
        "users, oldest first (admin)",
        "List users, oldest first; needs an admin token. One page, unless --all.",
    )
    add_paging(listing)

    orders = services.add_parser(
        "orders",
        help="OrderService: create, get, list, watch, cancel",
        description="OrderService's orders.",
    ).add_subparsers(title="commands", dest="command", required=True)
    create = add_command(
        orders,
        "create",
        orders_create,
        "place an order",
        "Place an order for a user (the user's own token, or admin). The amount is a decimal\n"
        "string, sent exactly (at most 9 decimal places). Prints the order, CREATED.\n\n"
        "  ecommerce orders create --user-id <user id> --amount 19.99 --currency USD",
    )
    create.add_argument("--user-id", required=True)
    create.add_argument("--amount", type=amount, required=True, help='e.g. "19.99"')
    create.add_argument("--currency", required=True, help="ISO 4217, e.g. USD")
    create.add_argument(
        "--request-id",
        help="a UUID: the same one again returns the same order (default: a fresh one)",
    )
    get = add_command(orders, "get", orders_get, "an order by id", "Print an order.")
    get.add_argument("id", help="the order's id")
    listing = add_command(
        orders,
        "list",
        orders_list,
        "orders, oldest first",
        "List a user's orders (--user-id, with their token), or everyone's (admin).\n"
        "One page, unless --all.",
    )
    listing.add_argument("--user-id", help="only this user's orders (required unless admin)")
    add_paging(listing)
    watch = add_command(
        orders,
        "watch",
        orders_watch,
        "follow an order until it is final",
        "Print the order now, then again after each status change; ends once it is PROCESSED,\n"
        "FAILED or CANCELLED. No deadline unless --timeout is given.\n\n"
        "  ecommerce orders watch <order id>\n"
        "  ecommerce -o json orders watch <order id>     # one JSON object per line",
    )
    watch.add_argument("id", help="the order's id")
    watch.add_argument(
        "--timeout", type=positive_seconds, metavar="SECONDS", help="give up after this long"
    )
    cancel = add_command(
        orders,
        "cancel",
        orders_cancel,
        "cancel an order still CREATED",
        "Cancel an order (its owner, or admin) while it is CREATED; cancelling it again\n"
        "changes nothing. FAILED_PRECONDITION once it is PROCESSED or FAILED.",
    )
    cancel.add_argument("id", help="the order's id")
    cancel.add_argument("--reason", default="", help="why (kept as the order's status_reason)")

    for commands in (users, orders):
        for command in commands.choices.values():
            add_global_options(command, suppress=True)
    return parser


def resolve_token(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as error:
            raise SettingsError(f"cannot read --token-file ({error.strerror})") from None
    else:
        token = (args.token or env.get("ECOMMERCE_TOKEN") or "").strip()
    if not token:
        raise SettingsError(
            "no token: set ECOMMERCE_TOKEN (or --token/--token-file), e.g."
            " $(make -s token SUB=<user id> SCOPE=user)"
        )
    return token


def tls_settings(args: argparse.Namespace, env: Mapping[str, str]) -> TlsSettings:
    """The project's TLS settings (CERTS_DIR, TLS_*_FILE, GRPC_INSECURE), flags first."""
    flags = {
        "CERTS_DIR": args.certs_dir,
        "TLS_CA_FILE": args.ca_file,
        "TLS_CERT_FILE": args.cert_file,
        "TLS_KEY_FILE": args.key_file,
    }
    merged = {**env, **{name: value for name, value in flags.items() if value}}
    return TlsSettings.from_env(merged, IDENTITY)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    printer = Printer(args.output, sys.stdout)
    try:
        with EcommerceClient(
            args.users_address or env.get("ECOMMERCE_USERS_ADDRESS") or DEFAULT_USERS_ADDRESS,
            args.orders_address or env.get("ECOMMERCE_ORDERS_ADDRESS") or DEFAULT_ORDERS_ADDRESS,
            tls_settings(args, env),
            resolve_token(args, env),
            deadline_seconds=args.deadline,
        ) as client:
            args.run(client, args, printer)
    except CallFailed as error:
        print(f"{PROGRAM}: {error.method} failed: {error.failure.describe()}", file=sys.stderr)
        return EXIT_CALL_FAILED
    except ValueError as error:  # SettingsError, or an amount Money cannot carry exactly
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


def run() -> None:
    """The console script."""
    sys.exit(main())
