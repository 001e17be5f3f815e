"""gs:// specifics (issue 7, item 1): kdgen's lock files on GCS. Exclusive create (`open(path, "xb")`)
is an upload with `ifGenerationMatch=0`, which GCS refuses with 412 when the object exists and
gcsfs raises as FileExistsError; these are the lock tests of tests/test_kdgen_concurrency.py, run
here against the loopback GCS emulator (tests/kdgen_gcs.py) instead of a local disk or S3.

Generate, resume, cache hit, `kdgen ls`, `kdgen verify`, push/pull and `kdtrain run` on gs:// are
the store tests of tests/test_kdgen_store.py, parametrized over S3 and GCS.
"""

from __future__ import annotations

import pytest

from kdgen_gcs import gcs_server  # noqa: F401  (fixture)
from test_kdgen_concurrency import test_lock_is_exclusive_and_released, test_stale_locks_are_broken_live_ones_kept  # noqa: F401  (run here on gs://)


@pytest.fixture
def store(gcs_server) -> str:
    """The `store` the imported lock tests ask for: a dataset directory in a new GCS bucket."""
    return gcs_server() + "/ds"
