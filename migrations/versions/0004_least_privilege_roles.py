"""A role per service, with only the privileges its RPCs and its outbox relay need.

`ecommerce` owns the schema and runs the migrations; `user_service` and `order_service` log in
with passwords (set outside the migrations: `make certs` and scripts/postgres.sh locally, the
init script in compose). user_service cannot touch orders; order_service cannot write users
(the orders -> users foreign key is checked with the owner's rights); the processor has no
database access at all. The roles are created here, without login, where they do not exist yet.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OUTBOX = "INSERT, SELECT, DELETE ON outbox_events"
GRANTS = {
    "user_service": ["SELECT, INSERT ON users", OUTBOX],
    "order_service": [
        "SELECT, INSERT, UPDATE ON orders",
        "SELECT, INSERT ON order_status_changes",
        OUTBOX,
    ],
}


def upgrade() -> None:
    op.execute("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC")
    op.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    for role, grants in GRANTS.items():
        op.execute(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') "
            f"THEN CREATE ROLE {role} NOLOGIN; END IF; END $$"
        )
        op.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        for grant in grants:
            op.execute(f"GRANT {grant} TO {role}")


def downgrade() -> None:
    for role, grants in GRANTS.items():
        for grant in grants:
            op.execute(f"REVOKE {grant} FROM {role}")
        op.execute(f"REVOKE USAGE ON SCHEMA public FROM {role}")
