"""A stage running past the broker's visibility timeout is not started twice at once.

Redis re-delivers any unacknowledged message older than the visibility timeout - even one whose
task is still running. Here the timeout is 2 s (SONGPIPE_VISIBILITY_TIMEOUT_S, with kombu's sweep
every second) and the token stage takes ~8 s, with a second idle GPU worker ready to take the
re-delivered message: the second delivery must back off at the claim and the stage run once.
"""
from __future__ import annotations

import pytest

from tests import reliability_fixtures as rf

pytestmark = pytest.mark.integration

SHORT_LEASE = {"SONGPIPE_VISIBILITY_TIMEOUT_S": "2"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_checkpoint_dir, redis_service):
    with rf.reliability_stack("visibility", tmp_path_factory.mktemp("visibility"), tiny_checkpoint_dir,
                              redis_service.claim_db(), SHORT_LEASE, reconciler=False) as running:
        rf.start_worker(running, "gpu")  # a second, idle GPU worker that can take the re-delivery
        yield running


def test_a_redelivered_running_stage_backs_off_instead_of_computing_twice(stack):
    job = stack.submit(rf.song("slow-80", max_audio_length_ms=8000))  # ~8 s token stage > 2 s lease
    view = stack.wait_for_job(job["id"], timeout_s=90)
    assert view["status"] == "succeeded", view.get("error_message")

    tokens = rf.stage_rows(stack, job["id"], "generate_tokens")
    assert len(tokens) == 1 and tokens[0]["status"] == "succeeded"
    row = tokens[0]
    assert row["deliveries"] == 1  # claimed once: computed once
    duplicates = row["environment"]["duplicate_deliveries"]
    assert duplicates, "the broker did not re-deliver the running stage; the test proves nothing"
    assert all(d["row_status"] == "running" for d in duplicates)  # skipped while the first one still ran
    assert any(d["pid"] != row["worker_pid"] for d in duplicates)  # ... by the other worker
    assert all(d["celery_task_id"] == row["celery_task_id"] for d in duplicates)  # the same message
