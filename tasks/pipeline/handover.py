"""The token stage hands over to a decode that follows it while it still generates (docs/streaming.md).

When a token attempt that will checkpoint codec windows starts, it sends the job's queued decode attempt. That
delivery claims the row; the chain's own delivery of the same attempt later finds it running and backs
off, and the early one sends the encode stage when it succeeds (tasks.recording, `continue_chain`).
"""
from __future__ import annotations

import logging

from db.engine import session_scope
from db.models import STAGE_CLAIMABLE, Job
from tasks.pipeline import chain as pipeline_chain
from tasks.pipeline.attempts import latest_by_stage

log = logging.getLogger(__name__)

FOLLOWER = "decode_audio"
FOLLOWED = "generate_tokens"


def start_follower(database_url: str, job_id: str) -> int | None:
    """Send the job's queued decode attempt now; its attempt number, or None when there is none to send."""
    with session_scope(database_url) as session:
        row = latest_by_stage(session, job_id).get(FOLLOWER)
        if row is None or row.status not in STAGE_CLAIMABLE:
            return None
        attempt = row.attempt
        length = (session.get_one(Job, job_id).request or {}).get("max_audio_length_ms")
    try:
        pipeline_chain.send_follower(job_id, FOLLOWER, attempt, FOLLOWED, length)
    except Exception:  # the chain still sends it after the token stage: streaming is lost, not the song
        log.exception("job %s: could not start the streaming decode early; it runs after the token stage", job_id)
        return None
    return attempt
