"""Orders may be cancelled by their owner before they are settled: status CANCELLED.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CONSTRAINT = "orders_status_known_check"


def upgrade() -> None:
    op.drop_constraint(_CONSTRAINT, "orders", type_="check")
    op.create_check_constraint(
        _CONSTRAINT, "orders", "status IN ('CREATED', 'PROCESSED', 'FAILED', 'CANCELLED')"
    )


def downgrade() -> None:
    # Fails while a cancelled order exists: it would have no status the old schema knows.
    op.drop_constraint(_CONSTRAINT, "orders", type_="check")
    op.create_check_constraint(
        _CONSTRAINT, "orders", "status IN ('CREATED', 'PROCESSED', 'FAILED')"
    )
