"""crash-safe delivery: arrival order per conversation, leases, reply handles, the outbox

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC = sa.DateTime(timezone=True)
OLD_STATUSES = "status IN ('received', 'answered', 'failed')"
NEW_STATUSES = "status IN ('received', 'generating', 'answered', 'delivered', 'skipped', 'failed')"


def upgrade() -> None:
    # SQLite cannot alter a CHECK constraint in place: batch mode copies the table.
    with op.batch_alter_table("processed_events", recreate="auto") as batch:
        batch.drop_constraint(op.f("ck_processed_events_status"), type_="check")
        batch.alter_column("owner", type_=sa.String(length=255), existing_nullable=False)
        batch.add_column(sa.Column("conversation", sa.String(length=600), nullable=False, server_default=""))
        batch.add_column(sa.Column("lease_expires_at", UTC, nullable=True))
        batch.add_column(sa.Column("reply_handle", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("final_text", sa.Text(), nullable=True))
        batch.add_column(sa.Column("final_kind", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("next_attempt_at", UTC, nullable=True))
        batch.add_column(sa.Column("last_error", sa.String(length=255), nullable=True))
    # Before this revision "answered" meant shown to the user: that is "delivered" now.
    op.execute("UPDATE processed_events SET status = 'delivered' WHERE status = 'answered'")
    with op.batch_alter_table("processed_events", recreate="auto") as batch:
        batch.create_check_constraint(op.f("ck_processed_events_status"), NEW_STATUSES)
        batch.alter_column("conversation", server_default=None, existing_type=sa.String(length=600))
        batch.alter_column("attempts", server_default=None, existing_type=sa.Integer())
    op.create_index(op.f("ix_processed_events_conversation_id"), "processed_events", ["conversation", "id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_processed_events_conversation_id"), table_name="processed_events")
    op.execute("UPDATE processed_events SET status = 'answered' WHERE status IN ('delivered', 'skipped')")
    op.execute("UPDATE processed_events SET status = 'received' WHERE status = 'generating'")
    with op.batch_alter_table("processed_events", recreate="auto") as batch:
        batch.drop_constraint(op.f("ck_processed_events_status"), type_="check")
        for column in (
            "last_error",
            "next_attempt_at",
            "attempts",
            "final_kind",
            "final_text",
            "reply_handle",
            "lease_expires_at",
            "conversation",
        ):
            batch.drop_column(column)
        batch.alter_column("owner", type_=sa.String(length=64), existing_nullable=False)
        batch.create_check_constraint(op.f("ck_processed_events_status"), OLD_STATUSES)
