"""admin dashboard: cancel audit columns, attempt requester, list/keyset and worker indexes

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cancel_requested_by', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('cancel_requested_at', sa.DateTime(timezone=True), nullable=True))
        # the (failed_stage|error_type, status, created_at) indexes below cover these prefixes
        batch_op.drop_index('ix_jobs_failed_stage')
        batch_op.drop_index('ix_jobs_error_type')
        batch_op.create_index('ix_jobs_created_at_id', ['created_at', 'id'], unique=False)
        batch_op.create_index('ix_jobs_failed_stage_status_created_at', ['failed_stage', 'status', 'created_at'], unique=False)
        batch_op.create_index('ix_jobs_error_type_status_created_at', ['error_type', 'status', 'created_at'], unique=False)

    with op.batch_alter_table('stage_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('requested_by', sa.String(length=64), nullable=True))
        batch_op.create_index('ix_stage_runs_worker_queue_id', ['worker_hostname', 'queue', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('stage_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_stage_runs_worker_queue_id')
        batch_op.drop_column('requested_by')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_error_type_status_created_at')
        batch_op.drop_index('ix_jobs_failed_stage_status_created_at')
        batch_op.drop_index('ix_jobs_created_at_id')
        batch_op.create_index('ix_jobs_error_type', ['error_type'], unique=False)
        batch_op.create_index('ix_jobs_failed_stage', ['failed_stage'], unique=False)
        batch_op.drop_column('cancel_requested_at')
        batch_op.drop_column('cancel_requested_by')
