"""audit chain: take the chain lock and read its head in one round trip (PostgreSQL)

Every transaction that records audit entries appends them to the chain at its commit,
under the chain lock. That took two statements: the advisory lock, then the head. A
function runs both in one call; its second statement takes a fresh snapshot after the
lock is granted (a PL/pgSQL function's statements do, under READ COMMITTED), so it reads
the head that the previous lock holder committed, never an older one. SQLite needs no
lock of its own (its write lock serialises the appends) and gets no function.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 00:20:00
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE OR REPLACE FUNCTION privacy_audit_head(lock_key bigint) RETURNS varchar
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock(lock_key);
            RETURN (SELECT hash FROM audit_events ORDER BY id DESC LIMIT 1);
        END
        $$
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS privacy_audit_head(bigint)")
