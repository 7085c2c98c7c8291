"""One artifact as an HTTP response, from whichever store holds it (docs/storage.md).

A local directory is handed to `send_file` (sendfile, conditional requests). A remote store's
object is streamed through this process: the artifact id stays the only capability a client
holds (no presigned URL to leak or expire), and a single `Range: bytes=a-b` is answered with 206
from a ranged read, so browsers can seek in the audio without downloading it whole.
"""
from __future__ import annotations

from flask import Response, request, send_file
from werkzeug.http import parse_range_header

from tasks.storage import ArtifactStore, ArtifactUnavailable


def artifact_response(store: ArtifactStore, sha256: str, *, kind: str, media_type: str, download_name: str,
                      max_age: int, as_attachment: bool = False) -> Response:
    """Raises ArtifactUnavailable (naming the artifact) when the store cannot hand it out."""
    path = store.local_path(sha256)
    if path is not None:
        if not path.is_file():
            raise ArtifactUnavailable(f"{kind} artifact {sha256} is missing from {store.describe_root()}",
                                      sha256, kind)
        return send_file(path, mimetype=media_type, conditional=True, etag=sha256, max_age=max_age,
                         download_name=download_name, as_attachment=as_attachment)
    if request.if_none_match.contains(sha256):  # content-addressed: the etag never changes
        return Response(status=304, headers={"ETag": f'"{sha256}"'})
    requested = parse_range_header(request.headers.get("Range"))
    ranges = requested.ranges if requested is not None and requested.units == "bytes" else []
    if len(ranges) == 1:
        first, last = ranges[0]
        if first < 0:  # a suffix range (bytes=-N) needs the size first
            size = store.open(sha256, 0, 0, kind=kind).size
            first, last = max(0, size + first), None
        stream = store.open(sha256, first, None if last is None else last - first, kind=kind)
        if stream.length == 0 and first >= stream.size:
            stream.close()
            return Response(status=416, headers={"Content-Range": f"bytes */{stream.size}"})
        status = 206
    else:
        stream, status = store.open(sha256, kind=kind), 200
    response = Response(stream, status=status, mimetype=media_type, direct_passthrough=True)
    response.headers["Content-Length"] = str(stream.length)
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["ETag"] = f'"{sha256}"'
    response.headers["Cache-Control"] = f"public, max-age={max_age}" if max_age else "no-cache"
    disposition = "attachment" if as_attachment else "inline"
    response.headers["Content-Disposition"] = f'{disposition}; filename="{download_name}"'
    if status == 206:
        response.headers["Content-Range"] = f"bytes {stream.start}-{stream.start + stream.length - 1}/{stream.size}"
    return response
