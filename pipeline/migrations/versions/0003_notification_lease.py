"""notifications: a sender's lease and the time of the last attempt

One delivery at a time may hold a notification while it talks to the mail server, so a
dramatiq retry and a reconciler nudge arriving together cannot both send it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 15:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import pipeline.db

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.add_column(sa.Column("updated_at", pipeline.db.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("claimed_until", pipeline.db.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_column("claimed_until")
        batch_op.drop_column("updated_at")
