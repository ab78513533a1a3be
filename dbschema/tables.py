"""The tables of the shared database. Each is owned by one service; the schema is defined once so
that foreign keys between them resolve and Alembic sees all of it."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    LargeBinary,
    Numeric,
    String,
    Text,
    Uuid,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from servicekit.db import Base
from servicekit.idempotency import RequestIdColumn

# The statuses an order can be in, as `orders.status` stores them (the lifecycle between them:
# order_service.status). Migrations keep the list of their own time.
ORDER_STATUSES = ("CREATED", "PROCESSED", "FAILED", "CANCELLED")


class UserRecord(RequestIdColumn, Base):
    """Owned by UserService."""

    __tablename__ = "users"
    __table_args__ = (Index("users_create_time_id_idx", "create_time", "id"),)
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012 (SQLAlchemy reads a plain dict)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    create_time: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


# NUMERIC(28, 9) holds every positive google.type.Money: int64 units and nine digits of nanos.
AMOUNT_TYPE = Numeric(28, 9)


class OrderRecord(RequestIdColumn, Base):
    """Owned by OrderService."""

    __tablename__ = "orders"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("currency_code ~ '^[A-Z]{3}$'", name="currency_code_iso4217"),
        CheckConstraint(
            f"status IN ({', '.join(repr(status) for status in ORDER_STATUSES)})",
            name="status_known",
        ),
        Index("orders_create_time_id_idx", "create_time", "id"),
        Index("orders_user_id_create_time_id_idx", "user_id", "create_time", "id"),
    )
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012 (SQLAlchemy reads a plain dict)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id"))
    amount: Mapped[Decimal] = mapped_column(AMOUNT_TYPE)
    currency_code: Mapped[str] = mapped_column(String(3))
    # The OrderStatus name without its ORDER_STATUS_ prefix.
    status: Mapped[str] = mapped_column(String(16))
    status_reason: Mapped[str] = mapped_column(Text, server_default="")
    create_time: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    update_time: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class OrderStatusChangeRecord(Base):
    """Owned by OrderService: one row per status transition an order went through."""

    __tablename__ = "order_status_changes"
    __table_args__ = (Index("order_status_changes_order_id_idx", "order_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    order_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orders.id"))
    old_status: Mapped[str] = mapped_column(String(16))
    new_status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    # The OrderStatusChanged event that announced this change.
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    change_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class OutboxEventRecord(Base):
    """Events committed with the change they describe, waiting for the relay to publish them.

    Rows are published in id order and deleted once the broker has acknowledged them: the table
    holds only what is still to be published.
    """

    __tablename__ = "outbox_events"
    __table_args__ = (Index("outbox_events_source_id_idx", "source", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    topic: Mapped[str] = mapped_column(Text)
    message_key: Mapped[str] = mapped_column(Text)
    # The full protobuf message name: the CloudEvents ce_type.
    event_type: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    occur_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    create_time: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    # The W3C traceparent of the call that wrote the event: its trace goes on through Kafka.
    traceparent: Mapped[str | None] = mapped_column(Text, nullable=True)
