"""PostgreSQL's side of least privilege: passwords required, a role per service, each allowed
only what its RPCs and its outbox relay need (migration 0004)."""

from __future__ import annotations

import psycopg2
import pytest
from sqlalchemy import make_url

from servicekit.db import libpq_dsn
from servicekit.local_credentials import as_role, role_url
from tests.conftest import TEST_DATABASE_URL


def connect_as(role: str, with_password: bool = True) -> psycopg2.extensions.connection:
    url = as_role(TEST_DATABASE_URL, role) if with_password else role_url(TEST_DATABASE_URL, role)
    return psycopg2.connect(libpq_dsn(url), connect_timeout=5)


@pytest.mark.parametrize("role", ["ecommerce", "user_service", "order_service", "postgres"])
def test_a_connection_without_a_password_is_refused(database_url: str, role: str) -> None:
    with pytest.raises(psycopg2.OperationalError, match="password"):
        connect_as(role, with_password=False)


def test_a_wrong_password_is_refused(database_url: str) -> None:
    url = make_url(role_url(TEST_DATABASE_URL, "order_service")).set(password="guess")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(libpq_dsn(url.render_as_string(hide_password=False)), connect_timeout=5)


# (role, statement): what each service's role must not be able to do.
FORBIDDEN = [
    (
        "user_service",
        "INSERT INTO orders (id, user_id, amount, currency_code, status)"
        " VALUES (gen_random_uuid(), gen_random_uuid(), 1, 'USD', 'PROCESSED')",
    ),
    ("user_service", "UPDATE orders SET status = 'PROCESSED'"),
    ("user_service", "SELECT count(*) FROM orders"),
    ("user_service", "DELETE FROM users"),
    (
        "user_service",
        "INSERT INTO order_status_changes (order_id, old_status, new_status, reason,"
        " event_id, change_time) VALUES (gen_random_uuid(), 'CREATED', 'PROCESSED', '',"
        " gen_random_uuid(), now())",
    ),
    ("order_service", "UPDATE users SET name = 'x'"),
    ("order_service", "DELETE FROM orders"),
    ("order_service", "DELETE FROM order_status_changes"),
    ("order_service", "DROP TABLE outbox_events"),
    ("order_service", "CREATE TABLE planted (id int)"),
]


@pytest.mark.parametrize(("role", "statement"), FORBIDDEN)
def test_a_service_role_is_refused_what_it_does_not_need(
    database_url: str, role: str, statement: str
) -> None:
    connection = connect_as(role)
    try:
        with connection.cursor() as cursor, pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cursor.execute(statement)
    finally:
        connection.rollback()
        connection.close()


@pytest.mark.parametrize(
    ("role", "statement"),
    [
        ("user_service", "SELECT count(*) FROM users"),
        ("user_service", "SELECT count(*) FROM outbox_events"),
        ("order_service", "SELECT count(*) FROM orders"),
        ("order_service", "SELECT count(*) FROM order_status_changes"),
    ],
)
def test_a_service_role_reads_what_it_serves(database_url: str, role: str, statement: str) -> None:
    connection = connect_as(role)
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
            assert cursor.fetchone() is not None
    finally:
        connection.close()
