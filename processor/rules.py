"""How an order's outcome is decided. Replace `CurrencyAndLimitRule` with any OrderRule."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from ecommerce.v1 import orders_pb2

from servicekit.money import money_to_decimal


@dataclass(frozen=True)
class Outcome:
    status: orders_pb2.OrderStatus.ValueType
    reason: str


class OrderRule(Protocol):
    def decide(self, order: orders_pb2.Order) -> Outcome: ...


@dataclass(frozen=True)
class CurrencyAndLimitRule:
    """PROCESSED when the currency is accepted and the amount is at most the limit."""

    accepted_currencies: frozenset[str]
    max_amount: Decimal

    def decide(self, order: orders_pb2.Order) -> Outcome:
        currency = order.amount.currency_code
        if currency not in self.accepted_currencies:
            accepted = ", ".join(sorted(self.accepted_currencies))
            return Outcome(
                orders_pb2.ORDER_STATUS_FAILED,
                f"ACCEPTED_CURRENCIES: {currency} is not one of {accepted}",
            )
        amount = money_to_decimal(order.amount)
        if amount > self.max_amount:
            return Outcome(
                orders_pb2.ORDER_STATUS_FAILED,
                f"MAX_ORDER_AMOUNT: {amount} {currency} is above {self.max_amount}",
            )
        return Outcome(orders_pb2.ORDER_STATUS_PROCESSED, "accepted")
