"""Pure logic: money, page tokens, the order lifecycle, settings."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from ecommerce.v1 import orders_pb2
from google.type import money_pb2
from psycopg2.extensions import parse_dsn

from bench.run import create_order_script
from dbschema.tables import ORDER_STATUSES
from order_service.status import STATUSES, order_status_transition, status_to_column
from processor.rules import CurrencyAndLimitRule
from processor.settings import ProcessorSettings
from servicekit.db import libpq_dsn
from servicekit.errors import FailedPrecondition, InvalidArgument
from servicekit.kafka import cloudevent_headers
from servicekit.money import decimal_to_money, money_to_decimal
from servicekit.pagination import Cursor, decode_page_token, encode_page_token, page_size
from servicekit.settings import ServiceSettings, SettingsError
from servicekit.sql import Statement
from user_service.validation import normalise_email


@pytest.mark.parametrize(
    ("units", "nanos", "value"),
    [
        (0, 1, Decimal("0.000000001")),
        (12, 340_000_000, Decimal("12.34")),
        (-3, -500_000_000, Decimal("-3.5")),
        (9_223_372_036_854_775_807, 999_999_999, Decimal("9223372036854775807.999999999")),
    ],
)
def test_money_round_trips_exactly(units: int, nanos: int, value: Decimal) -> None:
    money = money_pb2.Money(currency_code="EUR", units=units, nanos=nanos)
    assert money_to_decimal(money) == value
    assert decimal_to_money(value, "EUR") == money


def test_page_token_round_trips_and_is_tied_to_the_filter() -> None:
    cursor = Cursor(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), uuid.uuid4())
    token = encode_page_token(cursor, "user_id=abc")
    assert decode_page_token(token, "user_id=abc") == cursor
    assert decode_page_token("", "user_id=abc") is None
    with pytest.raises(InvalidArgument):
        decode_page_token(token, "user_id=other")


def test_page_size_defaults_and_coerces() -> None:
    assert page_size(0) == 50
    assert page_size(7) == 7
    assert page_size(5000) == 1000
    with pytest.raises(InvalidArgument):
        page_size(-1)


def test_order_lifecycle() -> None:
    created, processed, failed = (
        orders_pb2.ORDER_STATUS_CREATED,
        orders_pb2.ORDER_STATUS_PROCESSED,
        orders_pb2.ORDER_STATUS_FAILED,
    )
    assert order_status_transition(created, processed) is True
    assert order_status_transition(created, failed) is True
    assert order_status_transition(processed, processed) is False
    for current, requested in [(processed, failed), (failed, created), (processed, created)]:
        with pytest.raises(FailedPrecondition):
            order_status_transition(current, requested)


def test_the_lifecycle_and_the_orders_table_allow_the_same_statuses() -> None:
    assert {status_to_column(status) for status in STATUSES} == set(ORDER_STATUSES)
    assert set(orders_pb2.OrderStatus.values()) == {orders_pb2.ORDER_STATUS_UNSPECIFIED, *STATUSES}


def test_email_local_part_keeps_its_case() -> None:
    assert normalise_email(" Ann.Lee@MAIL.Example.ORG ") == "Ann.Lee@mail.example.org"


def test_settings_reject_unusable_values() -> None:
    settings = ServiceSettings.from_env("svc", "SVC_PORT", 50051, env={"SVC_PORT": "6000"})
    assert settings.port == 6000
    assert settings.listen_host == "127.0.0.1"
    for env in ({"SVC_PORT": "http"}, {"GRPC_MAX_WORKERS": "0"}, {"LOG_LEVEL": "LOUD"}):
        with pytest.raises(SettingsError):
            ServiceSettings.from_env("svc", "SVC_PORT", 50051, env=env)


def test_default_rule_names_the_rule_that_failed_an_order() -> None:
    rule = CurrencyAndLimitRule(frozenset({"USD", "EUR"}), Decimal("10000"))

    def decide(currency: str, units: int, nanos: int = 0) -> tuple[int, str]:
        amount = money_pb2.Money(currency_code=currency, units=units, nanos=nanos)
        outcome = rule.decide(orders_pb2.Order(amount=amount))
        return outcome.status, outcome.reason

    assert decide("USD", 10_000) == (orders_pb2.ORDER_STATUS_PROCESSED, "accepted")
    status, reason = decide("USD", 10_000, 1)
    assert status == orders_pb2.ORDER_STATUS_FAILED
    assert reason.startswith("MAX_ORDER_AMOUNT")
    status, reason = decide("JPY", 1)
    assert status == orders_pb2.ORDER_STATUS_FAILED
    assert reason.startswith("ACCEPTED_CURRENCIES")


def test_processor_settings_reject_bad_rules() -> None:
    settings = ProcessorSettings.from_env(
        {"ACCEPTED_CURRENCIES": "USD, CHF", "MAX_ORDER_AMOUNT": "5.5"}
    )
    assert settings.accepted_currencies == {"USD", "CHF"}
    assert settings.max_order_amount == Decimal("5.5")
    for env in (
        {"ACCEPTED_CURRENCIES": "usd"},
        {"MAX_ORDER_AMOUNT": "-1"},
        {"MAX_ORDER_AMOUNT": "NaN"},
        {"PROCESSOR_BATCH_SIZE": "1001"},  # more than one BatchUpdateOrderStatus takes
    ):
        with pytest.raises(SettingsError):
            ProcessorSettings.from_env(env)


def test_cloudevent_headers_are_utc_rfc3339() -> None:
    headers = dict(
        cloudevent_headers("id-1", "/src", "a.b.C", datetime(2026, 5, 1, 12, 0, tzinfo=UTC))
    )
    assert headers == {
        "ce_specversion": b"1.0",
        "ce_id": b"id-1",
        "ce_source": b"/src",
        "ce_type": b"a.b.C",
        "ce_time": b"2026-05-01T12:00:00Z",
        "content-type": b"application/protobuf",
    }


def test_pgbench_runs_every_parameter_of_create_orders_statement() -> None:
    script = create_order_script(str(uuid.uuid4()), b"\x0a\x01")
    assert "%(" not in script  # every parameter has a pgbench stand-in
    assert "INSERT INTO orders" in script and "INSERT INTO outbox_events" in script


def test_the_relay_connects_with_every_option_of_the_database_url() -> None:
    url = (
        "postgresql+psycopg2://app:p%40ss@db.internal:6432/shop"
        "?sslmode=verify-full&sslrootcert=/run/secrets/ca.pem&target_session_attrs=read-write"
    )
    assert parse_dsn(libpq_dsn(url)) == {
        "user": "app",
        "password": "p@ss",
        "host": "db.internal",
        "port": "6432",
        "dbname": "shop",
        "sslmode": "verify-full",
        "sslrootcert": "/run/secrets/ca.pem",
        "target_session_attrs": "read-write",
    }


def test_a_statement_numbers_each_named_parameter_once() -> None:
    statement = Statement("SELECT %(a)s::int + %(b)s::int WHERE %(a)s::int > 0")
    assert statement.parameters == ("a", "b")
    assert statement.prepare_sql == (
        f"PREPARE {statement.name} AS SELECT $1::int + $2::int WHERE $1::int > 0"
    )
    assert statement.execute_sql == f"EXECUTE {statement.name} (%s, %s)"
    assert Statement(statement.sql).name == statement.name  # the same SQL, the same name
