"""A store URL kdgen cannot open is one clear line and exit 2, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "url, says",
    [("foo://bucket/x", "Protocol not known: foo"), ("gs://bucket/x", "gcsfs")],
)
def test_unusable_store_url(url, says):
    try:
        import gcsfs  # noqa: F401

        if url.startswith("gs://"):
            pytest.skip("gcsfs is installed here")
    except ImportError:
        pass
    res = subprocess.run([sys.executable, "-m", "kdgen.cli", "ls", url], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdgen: error:") and says in lines[0]
    assert "Traceback" not in res.stderr
