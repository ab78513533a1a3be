"""How the CLI prints resources: protobuf JSON (one object per line) or aligned columns."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any, TextIO

from ecommerce.v1 import orders_pb2, users_pb2
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from ecommerce_client.money import money_to_text

STATUS_PREFIX = "ORDER_STATUS_"


def timestamp_text(timestamp: timestamp_pb2.Timestamp) -> str:
    if not timestamp.seconds and not timestamp.nanos:
        return ""
    return timestamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_text(order: orders_pb2.Order) -> str:
    return orders_pb2.OrderStatus.Name(order.status).removeprefix(STATUS_PREFIX)


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Any], str]
    width: int = 0  # at least this wide, even before the rows are known (a watch's)
    right: bool = False


USER_COLUMNS = (
    Column("ID", lambda user: user.id, 36),
    Column("EMAIL", lambda user: user.email),
    Column("NAME", lambda user: user.name),
    Column("CREATED", lambda user: timestamp_text(user.create_time), 20),
)
ORDER_COLUMNS = (
    Column("ID", lambda order: order.id, 36),
    Column("USER ID", lambda order: order.user_id, 36),
    Column("AMOUNT", lambda order: money_to_text(order.amount), 8, right=True),
    Column("CURRENCY", lambda order: order.amount.currency_code),
    Column("STATUS", status_text, 9),
    Column("UPDATED", lambda order: timestamp_text(order.update_time), 20),
    Column("REASON", lambda order: order.status_reason),
)
COLUMNS_OF: dict[type[Message], tuple[Column, ...]] = {
    users_pb2.User: USER_COLUMNS,
    orders_pb2.Order: ORDER_COLUMNS,
}


def json_line(message: Message) -> str:
    """The message's protobuf JSON on one line, every field included (empty ones too)."""
    return json_format.MessageToJson(
        message, indent=None, always_print_fields_with_no_presence=True
    )


class Table:
    """Rows under a header, each column as wide as its widest cell among the rows given to
    `widen` (all of them for a page; the first for a stream, whose later rows print at once)."""

    def __init__(self, columns: Sequence[Column]) -> None:
        self.columns = columns
        self.widths = [max(len(c.header), c.width) for c in columns]

    def widen(self, rows: Iterable[Message]) -> None:
        for row in rows:
            for index, column in enumerate(self.columns):
                self.widths[index] = max(self.widths[index], len(column.value(row)))

    def header(self) -> str:
        return self._line([c.header for c in self.columns])

    def row(self, message: Message) -> str:
        return self._line([c.value(message) for c in self.columns])

    def _line(self, cells: list[str]) -> str:
        padded = [
            cell.rjust(width) if column.right else cell.ljust(width)
            for cell, column, width in zip(cells, self.columns, self.widths, strict=True)
        ]
        return "  ".join(padded).rstrip()


class Printer:
    """Prints to `out` as `output` says ("json" or "table"), a line at a time, flushed."""

    def __init__(self, output: str, out: TextIO) -> None:
        self.output = output
        self.out = out

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def resource(self, message: Message) -> None:
        if self.output == "json":
            self._print(json_line(message))
        else:
            self.rows(type(message), [message])

    def page(self, response: Message, items: Sequence[Message], kind: type[Message]) -> None:
        """A list response: in JSON the response itself (next_page_token included); as a table
        its items."""
        if self.output == "json":
            self._print(json_line(response))
        else:
            self.rows(kind, items)

    def rows(self, kind: type[Message], messages: Sequence[Message]) -> None:
        table = Table(COLUMNS_OF[kind])
        table.widen(messages)
        self._print(table.header())
        for message in messages:
            self._print(table.row(message))

    def stream(self, kind: type[Message], messages: Iterable[Message]) -> int:
        """Each message as it comes: a JSON object per line, or a row; returns how many."""
        table = Table(COLUMNS_OF[kind])
        count = 0
        for message in messages:
            if self.output == "json":
                self._print(json_line(message))
            else:
                if count == 0:
                    table.widen([message])
                    self._print(table.header())
                self._print(table.row(message))
            count += 1
        if count == 0 and self.output == "table":
            self._print(table.header())
        return count
