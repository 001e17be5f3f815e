"""Deterministic train / held-out split of the kd prompt set.

Run from anywhere (standard library only):

    python3 data/split.py

Reads ``prompts.jsonl`` next to this script and (re)writes ``train.jsonl`` and
``heldout.jsonl`` in the same directory. The split is stratified by category:
within each category, prompts are ranked by the SHA-256 hex digest of their
``id`` and the first ``round(HELDOUT_FRACTION * n)`` (at least 1) go to
held-out. Lines are copied byte-for-byte and keep their order from
``prompts.jsonl``, so re-running produces byte-identical output.
"""

import hashlib
import json
import os
import sys
from collections import defaultdict

HELDOUT_FRACTION = 0.12

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "prompts.jsonl")
TRAIN = os.path.join(HERE, "train.jsonl")
HELDOUT = os.path.join(HERE, "heldout.jsonl")


def _key(prompt_id):
    return hashlib.sha256(prompt_id.encode("utf-8")).hexdigest()


def split(lines):
    """Return (train_lines, heldout_lines) for raw JSONL lines (bytes)."""
    by_cat = defaultdict(list)
    ids = []
    for raw in lines:
        rec = json.loads(raw.decode("utf-8"))
        ids.append(rec["id"])
        by_cat[rec["category"]].append(rec["id"])
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate ids in prompts.jsonl")
    held = set()
    for cat in sorted(by_cat):
        members = sorted(by_cat[cat], key=_key)
        k = max(1, round(HELDOUT_FRACTION * len(members)))
        held.update(members[:k])
    train, heldout = [], []
    for pid, raw in zip(ids, lines):
        (heldout if pid in held else train).append(raw)
    return train, heldout


def main():
    with open(SRC, "rb") as f:
        lines = [ln if ln.endswith(b"\n") else ln + b"\n" for ln in f if ln.strip()]
    train, heldout = split(lines)
    for path, part in ((TRAIN, train), (HELDOUT, heldout)):
        with open(path, "wb") as f:
            f.writelines(part)
    sys.stdout.write(
        "total %d  train %d  heldout %d\n" % (len(lines), len(train), len(heldout))
    )


if __name__ == "__main__":
    main()
