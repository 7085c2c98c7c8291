"""GET /metrics on the web tier: the job record counted at scrape time, plus this tier's own counters.

Registered by create_app with `register(app)`. The record's numbers (jobs by status, stage
attempts, reconciler re-sends) come from one set of GROUP BY queries, so every web process and
host answers the same. The counters (broker and database errors seen by the web tier) are this
process's, or all web processes' when PROMETHEUS_MULTIPROC_DIR is set (several gunicorn workers;
deploy/ sets it). Unauthenticated like the usual exporters: it holds counts, no job content;
bind the web tier or filter /metrics at the proxy when that matters.
"""
from __future__ import annotations

from flask import Blueprint, Flask, Response, current_app

from tasks import metrics

bp = Blueprint("metrics", __name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    record = current_app.extensions["songpipe_record_registry"]
    body = metrics.exposition([record, metrics.process_registry()])
    return Response(body, content_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})


def register(app: Flask) -> None:
    from prometheus_client import CollectorRegistry

    settings = app.config["SONGPIPE_SETTINGS"]
    record = CollectorRegistry(auto_describe=False)
    record.register(metrics.RecordCollector(settings.resolved_database_url))
    app.extensions["songpipe_record_registry"] = record
    metrics.count_database_errors_of_every_engine()
    metrics.metrics().broker_errors.labels(operation="publish")  # exported as 0 before the first failure
    app.register_blueprint(bp)
