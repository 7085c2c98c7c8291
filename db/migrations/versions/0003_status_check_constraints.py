"""status CHECK constraints; explicit skipped/superseded stage rows instead of queued ones that never run

Existing rows are migrated first: the unused 'pending' becomes 'queued'; a queued attempt with a newer
attempt of the same stage becomes 'superseded'; any other queued row of a finished job becomes 'skipped'.

Revision ID: 0003
Revises: 0002
"""
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# The values as of this revision, written out: a migration must not change when db/status.py does.
JOB_STATUSES = ('queued', 'running', 'succeeded', 'failed', 'cancelled')
STAGE_STATUSES = ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'lost', 'superseded', 'skipped',
                  'reused')
OLD_STAGE_STATUSES = ('pending', 'queued', 'running', 'succeeded', 'failed', 'cancelled', 'reused', 'lost')


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in sorted(values))


def upgrade() -> None:
    op.execute("UPDATE stage_runs SET status = 'queued' WHERE status = 'pending'")
    op.execute("""
        UPDATE stage_runs SET status = 'superseded',
               error_message = COALESCE(error_message, 'replaced by a newer attempt (migration 0003)')
        WHERE status = 'queued' AND EXISTS (
            SELECT 1 FROM stage_runs AS newer
            WHERE newer.job_id = stage_runs.job_id AND newer.stage = stage_runs.stage
              AND newer.attempt > stage_runs.attempt)""")
    op.execute("""
        UPDATE stage_runs SET status = 'skipped',
               error_message = COALESCE(error_message, 'never ran: its job had ended (migration 0003)')
        WHERE status = 'queued' AND job_id IN (
            SELECT id FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled'))""")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_check_constraint('ck_jobs_status', f"status IN ({_in(JOB_STATUSES)})")
    with op.batch_alter_table('stage_runs', schema=None) as batch_op:
        batch_op.create_check_constraint('ck_stage_runs_status', f"status IN ({_in(STAGE_STATUSES)})")


def downgrade() -> None:
    with op.batch_alter_table('stage_runs', schema=None) as batch_op:
        batch_op.drop_constraint('ck_stage_runs_status', type_='check')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('ck_jobs_status', type_='check')
    # the old vocabulary had neither: both meant "queued, and nothing will run it"
    op.execute("UPDATE stage_runs SET status = 'queued' WHERE status IN ('superseded', 'skipped')")
