"""A GCS-compatible HTTP endpoint on loopback for the store tests: gcp-storage-emulator, in memory.

`gcs_server` serves the emulator's JSON API on a free port from a thread of the test process and
points gcsfs at it for this process and for child processes, through the environment:
`STORAGE_EMULATOR_HOST` (gcsfs reads it on every request), anonymous credentials
(`FSSPEC_GS_TOKEN=anon`, which fsspec reads at import; set in fsspec's config for this process),
and `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: otherwise gcsfs 2026.x asks for each bucket's type
over gRPC/TLS, which the emulator does not speak (a 60 s timeout per bucket). Nothing leaves the
machine; CI needs only the `dev` extra (`gcsfs`, `gcp-storage-emulator`).

Two things real GCS does that the emulator (2026.7.19) does not are added here as routes:
* `moveTo`, the server-side rename behind gcsfs's `mv` (kdgen's temp-name-then-rename writes):
  without it gcsfs retries the 501 six times (~35 s) and then falls back to copy + delete;
* `ifGenerationMatch=0` on uploads (create only): real GCS answers 412, which gcsfs raises as
  FileExistsError — how kdgen's lock files (`open(path, "xb")`) are exclusive on GCS.

Use: `from kdgen_gcs import gcs_server  # noqa: F401` in a test module, then ask for `gcs_server`.
"""

from __future__ import annotations

import sys
import threading
from functools import partial
from http import HTTPStatus
from http.server import HTTPServer

import pytest

from kdgen_store_helpers import bucket_factory

_ENV = {"FSSPEC_GS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _move(request, response, storage):
    """POST /storage/v1/b/<bucket>/o/<src>/moveTo/o/<dest>: copy, then delete the source."""
    from gcp_storage_emulator.handlers import objects

    params = request.params
    params["dest_bucket_name"] = params["bucket_name"]
    objects.copy(request, response, storage)
    if response.status == HTTPStatus.OK:
        storage.delete_file(params["bucket_name"], params["object_id"])


def _insert(request, response, storage):
    """Uploads honour `ifGenerationMatch=0`: 412 when the object exists (gcsfs sends it for "xb")."""
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    if request.query.get("ifGenerationMatch") == ["0"]:
        # gcsfs names the object in the query (resumable uploads) or in the metadata part (multipart)
        name = request.query["name"][0] if "name" in request.query else request.data["meta"]["name"]
        try:
            storage.get_file_obj(request.params["bucket_name"], name)
        except NotFound:
            pass
        else:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold."}})
            return
    objects.insert(request, response, storage)


class _Server(HTTPServer):
    """One request at a time, as the emulator serves (its in-memory storage has no locks)."""

    def handle_error(self, request, client_address):
        # gcsfs's `info` races two requests and drops the loser's connection: not an error
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _routes(handlers: tuple) -> tuple:
    """The emulator's routes with `_move` and `_insert` in front (routes are tried in order)."""
    from gcp_storage_emulator import settings
    from gcp_storage_emulator.handlers import objects

    api, upload = settings.API_ENDPOINT, settings.UPLOAD_API_ENDPOINT
    bucket, obj = r"(?P<bucket_name>[-.\w]+)", r"(?P<object_id>.*[^/]+)"
    return (
        (rf"^{api}/b/{bucket}/o/{obj}/moveTo/o/(?P<dest_object_id>.*[^/]+)$", {"POST": _move}),
        (rf"^{upload}/b/{bucket}/o$", {"POST": _insert, "PUT": objects.upload_partial}),
        *handlers,
    )


@pytest.fixture(scope="session")
def gcs_server():
    """Yields a function `bucket() -> "gs://<new bucket>"` backed by the loopback GCS emulator."""
    pytest.importorskip("gcsfs")
    server_mod = pytest.importorskip("gcp_storage_emulator.server", reason="gcp-storage-emulator is needed for the GCS tests")
    from gcp_storage_emulator.storage import Storage

    with pytest.MonkeyPatch.context() as mp:  # undoes every change below at the end of the session
        for k, v in _ENV.items():
            mp.setenv(k, v)  # before gcsfs is imported in this process, and for child processes
        import fsspec
        import gcsfs.core

        mp.setattr(server_mod, "HANDLERS", _routes(server_mod.HANDLERS))
        httpd = _Server(("127.0.0.1", 0), partial(server_mod.RequestHandler, Storage(use_memory_fs=True)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        host, port = httpd.server_address[:2]
        mp.setenv("STORAGE_EMULATOR_HOST", f"http://{host}:{port}")
        # gcsfs picks its class when imported: if it was imported before this fixture ran, the
        # experimental one (gRPC bucket-type lookups) may be registered; use the plain one.
        registered = {proto: fsspec.get_filesystem_class(proto) for proto in ("gs", "gcs")}
        for proto in registered:
            mp.setitem(fsspec.config.conf, proto, {**fsspec.config.conf.get(proto, {}), "token": "anon"})
            fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
        gcsfs.core.GCSFileSystem.clear_instance_cache()
        yield bucket_factory(gcsfs.core.GCSFileSystem(token="anon"), "gs")
        httpd.shutdown()
        httpd.server_close()
        for proto, cls in registered.items():
            fsspec.register_implementation(proto, cls, clobber=True)
    gcsfs.core.GCSFileSystem.clear_instance_cache()
