"""The outbox holds only unpublished events, and inserts no longer notify.

The relay deletes a row once the broker acknowledged it (no publish mark, no cleanup), and finds
rows by polling: a NOTIFY at commit serialises the commits of every writer. Each service's relay
reads the rows of its own source, in id order.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DROP TRIGGER outbox_events_notify ON outbox_events")
    op.execute("DROP FUNCTION notify_outbox_events()")
    op.execute("DELETE FROM outbox_events WHERE publish_time IS NOT NULL")
    op.drop_index("outbox_events_publish_time_idx", table_name="outbox_events")
    op.drop_index("outbox_events_unpublished_idx", table_name="outbox_events")
    op.drop_column("outbox_events", "publish_time")
    op.create_index("outbox_events_source_id_idx", "outbox_events", ["source", "id"])


def downgrade() -> None:
    op.drop_index("outbox_events_source_id_idx", table_name="outbox_events")
    op.add_column(
        "outbox_events", sa.Column("publish_time", sa.DateTime(timezone=True), nullable=True)
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
