"""The installed `ecommerce` console script, run as a subprocess against the real servers: every
RPC, both outputs, and errors as a person or a script reads them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ecommerce.v1 import users_pb2

from servicekit.local_credentials import CERTS_DIR, token
from servicekit.server import RunningService
from tests.conftest import RelayHandle, unique_email
from tests.test_watch_and_cancel import nothing_published

# The console script `pip install -e .` put beside the interpreter running the tests.
ECOMMERCE = Path(sys.executable).parent / "ecommerce"
UNKNOWN_ID = "7b1e3a40-5c1d-4c8e-9a51-5d2f0f9d2b11"
# What the CLI reads from the environment, cleared so that only what a test sets counts.
CLI_VARIABLES = (
    "ECOMMERCE_USERS_ADDRESS",
    "ECOMMERCE_ORDERS_ADDRESS",
    "ECOMMERCE_TOKEN",
    "CERTS_DIR",
    "TLS_CA_FILE",
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "GRPC_INSECURE",
)
COMMANDS = [
    [],
    ["users"],
    ["users", "create"],
    ["users", "get"],
    ["users", "list"],
    ["orders"],
    ["orders", "create"],
    ["orders", "get"],
    ["orders", "list"],
    ["orders", "watch"],
    ["orders", "cancel"],
]


@dataclass(frozen=True)
class Cli:
    """The console script with the servers' addresses and the certificates in its environment,
    and `token` (admin by default) as ECOMMERCE_TOKEN."""

    env: Mapping[str, str]

    def run(self, *args: str, bearer: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "ECOMMERCE_TOKEN": bearer or token()}
        return subprocess.run(
            [str(ECOMMERCE), *args], env=env, capture_output=True, text=True, timeout=60
        )

    def ok(self, *args: str, bearer: str | None = None) -> str:
        done = self.run(*args, bearer=bearer)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        return done.stdout

    def json(self, *args: str, bearer: str | None = None) -> dict[str, Any]:
        (line,) = self.ok("--output", "json", *args, bearer=bearer).splitlines()
        parsed: dict[str, Any] = json.loads(line)
        return parsed

    def json_lines(self, *args: str, bearer: str | None = None) -> list[dict[str, Any]]:
        output = self.ok("--output", "json", *args, bearer=bearer)
        return [json.loads(line) for line in output.splitlines()]

    def fails(self, *args: str, bearer: str | None = None) -> subprocess.CompletedProcess[str]:
        done = self.run(*args, bearer=bearer)
        assert done.returncode != 0, done.stdout
        assert done.stdout == ""
        return done

    def popen(self, *args: str, bearer: str | None = None) -> subprocess.Popen[str]:
        env = {**self.env, "ECOMMERCE_TOKEN": bearer or token()}
        return subprocess.Popen(
            [str(ECOMMERCE), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def bare_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in CLI_VARIABLES}


@pytest.fixture(scope="module")
def cli(user_server: RunningService, order_server: RunningService) -> Cli:
    return Cli(
        {
            **bare_environment(),
            "ECOMMERCE_USERS_ADDRESS": f"localhost:{user_server.port}",
            "ECOMMERCE_ORDERS_ADDRESS": f"localhost:{order_server.port}",
            "CERTS_DIR": str(CERTS_DIR),
        }
    )


def as_user(user_id: str) -> str:
    return token(user_id, ["user"])


def table(output: str) -> list[list[str]]:
    """A table's lines as cells (columns are two spaces apart or more; no cell holds two)."""
    return [re.split(r" {2,}", line.strip()) for line in output.splitlines()]


def column_end(line: str, cell: str) -> int:
    return line.index(cell) + len(cell)


def place(cli: Cli, user: users_pb2.User, amount: str = "19.99") -> dict[str, Any]:
    args = ["orders", "create", "--user-id", user.id, "--amount", amount, "--currency", "USD"]
    return cli.json(*args, bearer=as_user(user.id))


# --help


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "ecommerce")
def test_every_command_explains_itself(command: list[str]) -> None:
    done = subprocess.run(
        [str(ECOMMERCE), *command, "--help"],
        env=bare_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: ecommerce {' '.join(command)}".rstrip())
    assert "--output" in done.stdout or len(command) < 2


def test_the_program_help_names_the_commands_the_environment_and_the_exit_codes() -> None:
    done = subprocess.run(
        [str(ECOMMERCE), "--help"], env=bare_environment(), capture_output=True, text=True
    )

    for text in ("users", "orders", "ECOMMERCE_TOKEN", "ECOMMERCE_USERS_ADDRESS", "CERTS_DIR"):
        assert text in done.stdout
    assert "exit status" in done.stdout


# UserService


def test_users_create_get_and_list(cli: Cli) -> None:
    email = unique_email("cli")

    created = cli.json("users", "create", "--email", email, "--name", "Ada Lovelace")
    another = cli.json("users", "create", "--email", unique_email("cli"), "--name", "Charles")
    got = cli.json("users", "get", created["id"])
    own = cli.json("users", "get", created["id"], bearer=as_user(created["id"]))
    first_page = cli.json("users", "list", "--page-size", "1")
    everyone = cli.json_lines("users", "list", "--all", "--page-size", "200")

    assert (created["email"], created["name"]) == (email, "Ada Lovelace")
    uuid.UUID(created["id"])
    assert got == created == own
    assert len(first_page["users"]) == 1 and first_page["nextPageToken"]
    assert created in everyone and another in everyone
    assert len({user["id"] for user in everyone}) == len(everyone)  # no page twice


def test_users_as_a_table_and_where_the_next_page_is(cli: Cli) -> None:
    email = unique_email("cli")
    created = cli.json("users", "create", "--email", email, "--name", "Grace Hopper")
    cli.json("users", "create", "--email", unique_email("cli"), "--name", "Another")

    rows = table(cli.ok("users", "get", created["id"]))
    first = cli.run("users", "list", "--page-size", "1")
    hint = re.fullmatch(r"more: --page-token (\S+)\n", first.stderr)
    assert first.returncode == 0 and hint, first.stderr
    after = cli.run("users", "list", "--page-size", "1", "--page-token", hint[1])
    second = table(after.stdout)

    assert rows[0] == ["ID", "EMAIL", "NAME", "CREATED"]
    assert rows[1][:3] == [created["id"], email, "Grace Hopper"]
    assert rows[1][3].endswith("Z")
    assert table(first.stdout)[0] == second[0] == rows[0]
    assert len(table(first.stdout)) == len(second) == 2
    assert table(first.stdout)[1] != second[1]


def test_a_create_with_the_same_request_id_returns_the_same_user(cli: Cli) -> None:
    request_id = str(uuid.uuid4())
    args = ["users", "create", "--email", unique_email("cli"), "--name", "Once"]

    first = cli.json(*args, "--request-id", request_id)
    again = cli.json(*args, "--request-id", request_id)

    assert again == first


# OrderService


def test_orders_create_get_and_list(cli: Cli, user: users_pb2.User) -> None:
    bearer = as_user(user.id)

    created = place(cli, user, "19.99")
    got = cli.json("orders", "get", created["id"], bearer=bearer)
    page = cli.json("orders", "list", "--user-id", user.id, bearer=bearer)
    every = cli.json_lines("orders", "list", "--user-id", user.id, "--all", "--page-size", "1")

    assert created["amount"] == {"currencyCode": "USD", "units": "19", "nanos": 990000000}
    assert (created["userId"], created["status"]) == (user.id, "ORDER_STATUS_CREATED")
    assert got == created
    assert page == {"orders": [created], "nextPageToken": ""}
    assert every == [created]


def test_orders_as_a_table_with_amounts_as_decimal_strings(cli: Cli, user: users_pb2.User) -> None:
    bearer = as_user(user.id)
    first = place(cli, user, "19.99")
    second = place(cli, user, "1000")

    output = cli.ok("orders", "list", "--user-id", user.id, bearer=bearer)
    header, *orders = table(output)
    lines = output.splitlines()

    assert header == ["ID", "USER ID", "AMOUNT", "CURRENCY", "STATUS", "UPDATED", "REASON"]
    assert [row[:5] for row in orders] == [
        [first["id"], user.id, "19.99", "USD", "CREATED"],
        [second["id"], user.id, "1000", "USD", "CREATED"],
    ]
    # Amounts right-aligned under their header, the other columns left-aligned under theirs.
    assert (
        column_end(lines[1], "19.99")
        == column_end(lines[2], "1000")
        == column_end(lines[0], "AMOUNT")
    )
    assert lines[1].index("CREATED") == lines[2].index("CREATED") == lines[0].index("STATUS")


def test_two_creates_without_a_request_id_are_two_orders(cli: Cli, user: users_pb2.User) -> None:
    assert place(cli, user)["id"] != place(cli, user)["id"]


def test_cancel_then_watch_prints_the_cancelled_order_and_ends(
    cli: Cli, user: users_pb2.User
) -> None:
    bearer = as_user(user.id)
    order = place(cli, user)

    cancelled = cli.json("orders", "cancel", order["id"], "--reason", "changed", bearer=bearer)
    seen = cli.json_lines("orders", "watch", order["id"], "--timeout", "30", bearer=bearer)

    assert (cancelled["status"], cancelled["statusReason"]) == ("ORDER_STATUS_CANCELLED", "changed")
    assert seen == [cancelled]


def test_watch_prints_created_then_cancelled_as_the_order_is_cancelled(
    cli: Cli, user: users_pb2.User, relay: RelayHandle
) -> None:
    bearer = as_user(user.id)
    # Its events wait in the outbox until the cancel: no processor could settle it first.
    with nothing_published(relay):
        order = place(cli, user)
        watcher = cli.popen("orders", "watch", order["id"], "--timeout", "60", bearer=bearer)
        try:
            assert watcher.stdout is not None
            header = watcher.stdout.readline()
            first = watcher.stdout.readline()
            assert header.split()[:2] == ["ID", "USER"]
            assert first.split()[0] == order["id"] and " CREATED " in first
            cli.ok("orders", "cancel", order["id"], "--reason", "too slow", bearer=bearer)
        except BaseException:
            watcher.kill()
            raise
    rest, errors = watcher.communicate(timeout=60)

    assert watcher.returncode == 0, errors
    (last,) = rest.splitlines()
    assert last.split()[0] == order["id"]
    assert " CANCELLED " in last and last.endswith("too slow")


# Errors: code, reason, message and field violations on stderr, and a non-zero exit


def test_an_unknown_order_is_not_found_with_its_reason(cli: Cli) -> None:
    done = cli.fails("orders", "get", UNKNOWN_ID)

    assert done.returncode == 1
    assert "NOT_FOUND (ORDER_NOT_FOUND)" in done.stderr
    assert f"order {UNKNOWN_ID} does not exist" in done.stderr


def test_watching_an_unknown_order_fails_the_same_way(cli: Cli) -> None:
    done = cli.fails("orders", "watch", UNKNOWN_ID)

    assert "WatchOrder failed: NOT_FOUND (ORDER_NOT_FOUND)" in done.stderr


def test_a_zero_amount_is_invalid_and_names_the_field(cli: Cli, user: users_pb2.User) -> None:
    args = ["orders", "create", "--user-id", user.id, "--amount", "0", "--currency", "USD"]

    done = cli.fails(*args, bearer=as_user(user.id))

    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr
    assert "field amount: must be greater than zero" in done.stderr


def test_a_second_user_with_the_same_email_is_refused(cli: Cli, user: users_pb2.User) -> None:
    done = cli.fails("users", "create", "--email", user.email, "--name", "Copy")

    assert "ALREADY_EXISTS (EMAIL_ALREADY_REGISTERED)" in done.stderr


def test_another_users_order_cannot_be_cancelled(cli: Cli, user: users_pb2.User) -> None:
    order = place(cli, user)

    done = cli.fails("orders", "cancel", order["id"], bearer=as_user(str(uuid.uuid4())))

    assert "CancelOrder failed: PERMISSION_DENIED" in done.stderr


@pytest.mark.parametrize("amount", ["abc", "NaN", "Infinity", "1.0000000001"])
def test_an_amount_money_cannot_carry_exactly_is_refused_before_any_call(
    cli: Cli, amount: str
) -> None:
    args = ["orders", "create", "--user-id", UNKNOWN_ID, "--amount", amount, "--currency", "USD"]

    done = cli.fails(*args)

    assert done.returncode == 2
    assert "amount" in done.stderr


def test_without_a_token_it_says_how_to_get_one(cli: Cli) -> None:
    env = {k: v for k, v in cli.env.items() if k != "ECOMMERCE_TOKEN"}
    done = subprocess.run(
        [str(ECOMMERCE), "users", "list"], env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 2
    assert "ECOMMERCE_TOKEN" in done.stderr and "make -s token" in done.stderr


def test_without_the_certificate_it_says_so(cli: Cli, tmp_path: Path) -> None:
    done = cli.fails("--certs-dir", str(tmp_path), "users", "list")

    assert done.returncode == 2
    assert "cannot read the CA certificate" in done.stderr and "make certs" in done.stderr


# Settings from flags, before or after the command


def test_flags_instead_of_the_environment(
    user_server: RunningService, order_server: RunningService, user: users_pb2.User
) -> None:
    with_flags = [
        "--users-address",
        f"localhost:{user_server.port}",
        "--ca-file",
        str(CERTS_DIR / "ca.crt"),
        "--cert-file",
        str(CERTS_DIR / "client.crt"),
        "--key-file",
        str(CERTS_DIR / "client.key"),
    ]
    nowhere = {**bare_environment(), "CERTS_DIR": "/nonexistent"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(ECOMMERCE), *args], env=nowhere, capture_output=True, text=True, timeout=60
        )

    before = run(*with_flags, "--token", token(), "-o", "json", "users", "get", user.id)
    after = run("users", "get", user.id, *with_flags, "--token", token(), "--output", "json")

    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout)["id"] == user.id
    assert after.stdout == before.stdout


def test_a_token_from_a_file(cli: Cli, user: users_pb2.User, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(as_user(user.id) + "\n")
    env = {k: v for k, v in cli.env.items() if k != "ECOMMERCE_TOKEN"}

    done = subprocess.run(
        [str(ECOMMERCE), "--token-file", str(token_file), "-o", "json", "users", "get", user.id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["email"] == user.email
