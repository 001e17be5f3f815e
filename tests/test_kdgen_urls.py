"""A store URL kdgen cannot open is one clear line and exit 2, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


# gcsfs is installed with the dev extra: a Python where `import gcsfs` fails stands for a plain install
WITHOUT_GCSFS = "import sys; sys.modules['gcsfs'] = None; from kdgen.cli import main; sys.argv[0] = 'kdgen'; main()"


@pytest.mark.parametrize(
    "url, says, missing",
    [("foo://bucket/x", "Protocol not known: foo", False), ("gs://bucket/x", "gcsfs", True)],
)
def test_unusable_store_url(url, says, missing):
    start = [sys.executable, "-c", WITHOUT_GCSFS] if missing else [sys.executable, "-m", "kdgen.cli"]
    res = subprocess.run([*start, "ls", url], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdgen: error:") and says in lines[0]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "url, env",
    [
        ("s3://bucket/x", {"FSSPEC_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}),
        ("hf://datasets/org/name", {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}),
    ],
)
def test_unreachable_store_is_one_line(url, env):
    """A store that refuses the connection (port 9 on loopback: nothing listens) is one line, exit 2."""
    import os

    res = subprocess.run([sys.executable, "-m", "kdgen.cli", "ls", url], capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdgen: error: cannot reach the store"), res.stderr
