"""The audit log and its retention anchor."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("request_id", sa.String(64), nullable=False, unique=True),
        sa.Column("time", sa.String(32), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("endpoint", sa.Text, nullable=False),
        sa.Column("client", sa.Text),
        sa.Column("principal", sa.Text),
        sa.Column("user", sa.Text),
        sa.Column("model", sa.Text),
        sa.Column("params", sa.Text),
        sa.Column("prompt", sa.Text),
        sa.Column("output", sa.Text),
        sa.Column("prompt_tokens", sa.Integer),
        sa.Column("cached_tokens", sa.Integer),
        sa.Column("generated_tokens", sa.Integer),
        sa.Column("ttft_ms", sa.Float),
        sa.Column("latency_ms", sa.Float),
        sa.Column("finish_reason", sa.String(32)),
        sa.Column("status", sa.Integer),
        sa.Column("error_code", sa.String(64)),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_log_time", "audit_log", ["time"])
    op.create_table(
        "audit_anchor",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_anchor")
    op.drop_table("audit_log")
