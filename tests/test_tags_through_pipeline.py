"""Issue 'Text stages', through the whole pipeline: no tags and no style still reach the model as tags.

A deployment whose default tags backend is the embedded tagger gets a job with neither tags nor a
style; the tags stage chooses tags from the lyrics (recorded as the `embedding` backend) and the
token stage receives exactly that non-empty tag string - never an empty one.
"""
from __future__ import annotations

import pytest

from tests.stack_fixtures import database, running_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedding_stack(tmp_path_factory, redis_service, tiny_checkpoint_dir):
    work = tmp_path_factory.mktemp("embedding-stack")
    with database("sqlite", work / "db") as url:
        with running_stack("embedding", work / "stack", url, redis_service.claim_db(), tiny_checkpoint_dir,
                           extra_env={"SONGPIPE_DEFAULT_TAGS_BACKEND": "embedding"}) as stack:
            yield stack


def _stage(job: dict, name: str) -> dict:
    return next(row for row in job["stages"] if row["stage"] == name)


def test_job_without_tags_or_style_gets_tags_from_the_embedded_tagger(embedding_stack):
    lyrics = "[verse]\nwalking down the rainy street\nmy heart is heavy, tears at my feet\n\n[chorus]\nsad and alone"
    submitted = embedding_stack.submit({"lyrics": lyrics, "max_audio_length_ms": 800})
    job = embedding_stack.wait_for_job(submitted["id"], timeout_s=240)
    assert job["status"] == "succeeded", embedding_stack.logs()
    tags = _stage(job, "generate_tags")
    assert tags["inputs"]["user_tags"] is None and tags["inputs"]["style"] is None
    assert tags["outputs"]["backend_used"] == "embedding"
    assert tags["outputs"]["tags"] and tags["outputs"]["tags_string"] == ",".join(tags["outputs"]["tags"])
    tokens = _stage(job, "generate_tokens")
    assert tokens["inputs"]["tags"] == tags["outputs"]["tags_string"] != ""
    assert tokens["outputs"]["tags_text"].startswith("<tag>") and tokens["outputs"]["tags_text"] != "<tag></tag>"
