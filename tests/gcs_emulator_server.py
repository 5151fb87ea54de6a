"""gcp-storage-emulator with the parts of the GCS JSON API that tensorstore (Orbax's
writer) relies on and the emulator lacks: the generation preconditions (ifGenerationMatch,
ifGenerationNotMatch) on reads, writes and deletes, and the x-goog-generation header of a
media read. A file named `deny_writes` in its folder makes every write a 403, as a bucket
whose account has lost write access (roles/storage.objectViewer) answers. Run as `python gcs_emulator_server.py start --host ... --port ...`, the
emulator's own command line. Its server handles one request at a time, so a precondition
check and the write it guards cannot interleave with another request."""

import os
import sys
from http import HTTPStatus, server

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket: str, name: str) -> int:
    """The object's generation; 0 when there is none (GCS's meaning of ifGenerationMatch=0)."""
    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return 0


def _object_name(request) -> str | None:
    if "object_id" in request.params:
        return request.params["object_id"]
    if "name" in request.query:
        return request.query["name"][0]
    return None


def _guarded(handler, read: bool):
    def run(request, response, storage, *args, **kwargs):
        bucket, name = request.params.get("bucket_name"), _object_name(request)
        match, not_match = request.query.get("ifGenerationMatch"), request.query.get("ifGenerationNotMatch")
        if name is not None and (match or not_match):
            current = _generation(storage, bucket, name)
            if read and current == 0:
                response.status = HTTPStatus.NOT_FOUND
                return None
            if match and int(match[0]) != current:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
            if not_match and int(not_match[0]) == current:
                response.status = HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED
                response["x-goog-generation"] = str(current)
                return None
        if read and name is not None:
            current = _generation(storage, bucket, name)
            if current:
                response["x-goog-generation"] = str(current)
        return handler(request, response, storage, *args, **kwargs)

    return run


DENY = "deny_writes"


def _denied(handler):
    """GCS's answer to a write from an account that may only read."""
    def run(request, response, storage, *args, **kwargs):
        if os.path.exists(DENY):
            message = ("anonymous-caller does not have storage.objects.create access to the Google Cloud "
                       "Storage object. Permission 'storage.objects.create' denied on resource.")
            response.status = HTTPStatus.FORBIDDEN
            response.json({"error": {"code": 403, "message": message,
                                     "errors": [{"message": message, "domain": "global", "reason": "forbidden"}]}})
            return None
        return handler(request, response, storage, *args, **kwargs)

    return run


# Clients open many connections at once (gcsfs, tensorstore); the default backlog of 5 drops
# the rest, which then wait for TCP's retransmits (seconds each).
server.HTTPServer.request_queue_size = 1024

# Patched before the server module builds its routing table from these functions.
objects.download = _guarded(objects.download, read=True)
objects.get = _guarded(objects.get, read=True)
objects.insert = _guarded(objects.insert, read=False)
objects.delete = _guarded(objects.delete, read=False)
for _name in ("insert", "upload_partial", "xml_upload", "compose", "copy", "rewrite", "delete", "patch", "batch"):
    setattr(objects, _name, _denied(getattr(objects, _name)))

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
