"""Users and orders.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=True),
        sa.Column(
            "create_time", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="users_pkey"),
        sa.UniqueConstraint("email", name="users_email_key"),
        sa.UniqueConstraint("request_id", name="users_request_id_key"),
    )
    op.create_index("users_create_time_id_idx", "users", ["create_time", "id"])

    op.create_table(
        "orders",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("amount", sa.Numeric(28, 9), nullable=False),
        sa.Column("currency_code", sa.String(3), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_reason", sa.Text(), server_default="", nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=True),
        sa.Column(
            "create_time", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "update_time", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="orders_pkey"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="orders_user_id_fkey"),
        sa.UniqueConstraint("request_id", name="orders_request_id_key"),
        sa.CheckConstraint("amount > 0", name="orders_amount_positive_check"),
        sa.CheckConstraint(
            "currency_code ~ '^[A-Z]{3}$'", name="orders_currency_code_iso4217_check"
        ),
        sa.CheckConstraint(
            "status IN ('CREATED', 'PROCESSED', 'FAILED')", name="orders_status_known_check"
        ),
    )
    op.create_index("orders_create_time_id_idx", "orders", ["create_time", "id"])
    op.create_index("orders_user_id_create_time_id_idx", "orders", ["user_id", "create_time", "id"])


def downgrade() -> None:
    op.drop_table("orders")
    op.drop_table("users")
