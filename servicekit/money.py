"""google.type.Money <-> Decimal. Money is never a float."""

from __future__ import annotations

import re
from decimal import Decimal

from google.type import money_pb2

from servicekit.errors import InvalidArgument, excerpt

NANOS_PER_UNIT = 1_000_000_000
_MAX_NANOS = NANOS_PER_UNIT - 1
_CURRENCY_CODE = re.compile(r"[A-Z]{3}")


def money_to_decimal(money: money_pb2.Money, field: str = "amount") -> Decimal:
    """Validates a Money (currency code shape, nanos range and sign) and returns its exact value."""
    if not _CURRENCY_CODE.fullmatch(money.currency_code):
        raise InvalidArgument(
            f"{field}.currency_code",
            f"must be three upper-case letters (ISO 4217), got {excerpt(money.currency_code)}",
        )
    if not -_MAX_NANOS <= money.nanos <= _MAX_NANOS:
        raise InvalidArgument(f"{field}.nanos", f"must be within ±{_MAX_NANOS}, got {money.nanos}")
    if (money.units > 0 and money.nanos < 0) or (money.units < 0 and money.nanos > 0):
        raise InvalidArgument(f"{field}.nanos", "must have the same sign as units")
    return Decimal(money.units) + Decimal(money.nanos).scaleb(-9)


def decimal_to_money(value: Decimal, currency_code: str) -> money_pb2.Money:
    units = int(value)  # truncates toward zero, so units and nanos share the sign
    nanos = int((value - units) * NANOS_PER_UNIT)
    return money_pb2.Money(currency_code=currency_code, units=units, nanos=nanos)
