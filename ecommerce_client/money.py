"""Amounts as Decimals (never floats) and their google.type.Money."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from google.type import money_pb2

from servicekit.money import decimal_to_money

MAX_FRACTION_DIGITS = 9  # Money's nanos


def exact_amount(amount: Decimal) -> Decimal:
    """`amount` if Money can carry it exactly: finite, at most nine decimal places (trailing
    zeros aside); ValueError otherwise, never a rounding. A float is a TypeError."""
    if isinstance(amount, bool) or not isinstance(amount, Decimal | int):
        raise TypeError(f"amount must be a Decimal, got {type(amount).__name__}")
    value = Decimal(amount)
    if not value.is_finite():
        raise ValueError(f"amount must be a finite number, got {value}")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_FRACTION_DIGITS:
        value = value.normalize()  # 1.50000000000 has one decimal place, not eleven
        exponent = value.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -MAX_FRACTION_DIGITS:
            raise ValueError(f"amount has more than {MAX_FRACTION_DIGITS} decimal places: {amount}")
    return value


def parse_amount(text: str) -> Decimal:
    """A decimal string ("19.99") as the exact Decimal Money carries; ValueError otherwise."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"amount is not a decimal number: {text!r}") from None
    return exact_amount(value)


def amount_to_money(amount: Decimal, currency: str) -> money_pb2.Money:
    return decimal_to_money(exact_amount(amount), currency)


def money_to_text(money: money_pb2.Money) -> str:
    """The amount as a decimal string: 19 units and 990000000 nanos are "19.99"."""
    value = Decimal(money.units) + Decimal(money.nanos).scaleb(-MAX_FRACTION_DIGITS)
    return f"{value.normalize():f}"
