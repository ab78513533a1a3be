"""Each outbox event keeps the W3C traceparent of the call that wrote it, so the trace goes on
through Kafka (the relay sends it as the `traceparent` header).

Nullable: rows written before this, or outside any trace, have none. The grants of 0004 are on the
whole table, so they cover the new column.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbox_events", sa.Column("traceparent", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("outbox_events", "traceparent")
