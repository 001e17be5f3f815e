"""A real S3-compatible HTTP endpoint on loopback for the store tests: moto in server mode.

`s3_server` starts `moto.server.ThreadedMotoServer` on a free port inside the test process and
points s3fs at it for this process (fsspec's config) and for child processes (the
`FSSPEC_S3_ENDPOINT_URL` variable, which fsspec reads at import), with dummy credentials. Nothing
leaves the machine; CI needs only the `dev` extra (`moto[server]`, `s3fs`).

Use: `from kdgen_s3 import s3_server  # noqa: F401` in a test module, then ask for `s3_server`.
"""

from __future__ import annotations

import logging
import os

import pytest

from kdgen_store_helpers import bucket_factory

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """Yields a function `bucket() -> "s3://<new bucket>"` backed by the loopback moto server."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] (flask) is needed for the S3 tests")
    import fsspec
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*_ENV, "FSSPEC_S3_ENDPOINT_URL"]}
    os.environ.update(_ENV)
    os.environ["FSSPEC_S3_ENDPOINT_URL"] = endpoint  # child processes (fsspec reads it at import)
    conf_before = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {**(conf_before or {}), "endpoint_url": endpoint}  # this process
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)

    yield bucket_factory(fs, "s3")
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if conf_before is None:
        fsspec.config.conf.pop("s3", None)
    else:
        fsspec.config.conf["s3"] = conf_before
    s3fs.S3FileSystem.clear_instance_cache()
