"""Transactional outbox and the history of order status changes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "order_status_changes",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("old_status", sa.String(16), nullable=False),
        sa.Column("new_status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("change_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="order_status_changes_pkey"),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.id"], name="order_status_changes_order_id_fkey"
        ),
        sa.UniqueConstraint("event_id", name="order_status_changes_event_id_key"),
    )
    op.create_index("order_status_changes_order_id_idx", "order_status_changes", ["order_id"])

    op.create_table(
        "outbox_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("message_key", sa.Text(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("occur_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "create_time", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("publish_time", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="outbox_events_pkey"),
        sa.UniqueConstraint("event_id", name="outbox_events_event_id_key"),
    )
    op.create_index(
        "outbox_events_unpublished_idx",
        "outbox_events",
        ["id"],
        postgresql_where=sa.text("publish_time IS NULL"),
    )
    op.create_index(
        "outbox_events_publish_time_idx",
        "outbox_events",
        ["publish_time"],
        postgresql_where=sa.text("publish_time IS NOT NULL"),
    )
    # Wake the relay when events commit: NOTIFY is delivered at commit, once per transaction.
    op.execute(
        """
        CREATE FUNCTION notify_outbox_events() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          PERFORM pg_notify('outbox_events', '');
          RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER outbox_events_notify AFTER INSERT ON outbox_events"
        " FOR EACH STATEMENT EXECUTE FUNCTION notify_outbox_events()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER outbox_events_notify ON outbox_events")
    op.execute("DROP FUNCTION notify_outbox_events()")
    op.drop_table("outbox_events")
    op.drop_table("order_status_changes")
