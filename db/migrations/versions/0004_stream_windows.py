"""stream_windows: the codec windows decoded while a song was still being generated

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'stream_windows',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('job_id', sa.String(32), sa.ForeignKey('jobs.id', ondelete='CASCADE'), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('window', sa.Integer(), nullable=False),
        sa.Column('frame_start', sa.Integer(), nullable=False),
        sa.Column('frame_end', sa.Integer(), nullable=False),
        sa.Column('tokens_sha256', sa.String(64), nullable=False),
        sa.Column('tokens_attempt', sa.Integer(), nullable=False),
        sa.Column('pcm_sha256', sa.String(64), nullable=False),
        sa.Column('sample_start', sa.BigInteger(), nullable=False),
        sa.Column('sample_end', sa.BigInteger(), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('decode_s', sa.Float(), nullable=False),
        sa.UniqueConstraint('job_id', 'attempt', 'window', name='uq_stream_windows_job_attempt_window'),
    )


def downgrade() -> None:
    op.drop_table('stream_windows')
