"""`kdgen upgrade SRC DST`: rewrite a format v1 teacher dataset as format v2.

v1 shards are read through kd's v1 reader (kdcore/codec_v1.py) and written again through the v2
writer: the same rows, ids and text; log-probs as v1 held them (quantised to 1/512 nats — an
upgrade cannot restore the precision v1 dropped), rounded to v2's 11 significant bits; the tail
column computed from them. The format version is part of the fingerprint, so the result is a new
dataset at DST/<new fingerprint>; its manifest keeps the teacher, tokenizer, generation and prompt
records and says where it came from (`upgraded_from`: fingerprint, format version, time). Shards
first, then the card, then the manifest (the commit); a complete result is returned at once.

Test: `pytest tests/test_kdgen_format_v2.py -k upgrade`.
"""

from __future__ import annotations

import pyarrow.parquet as pq

import kdcore.dataset as kds
import kdcore.io as kio
import kdgen
from kdcore import codec
from kdcore.card import write_card
from kdcore.errors import KdError
from kdcore.verify import verify


def upgrade(src: str, dest: str) -> str:
    """Rewrite the v1 dataset at `src` as v2 under the root `dest`; returns the new dataset's URL."""
    ds = kds.TeacherDataset(src)
    if ds.version == codec.FORMAT_VERSION:
        raise KdError(f"{src} is already format v{codec.FORMAT_VERSION}; nothing to upgrade (copy it with `kdgen push`)")
    old = ds.manifest
    core = {key: old[key] for key in ("teacher", "tokenizer", "generation", "prompts")} | {"format_version": codec.FORMAT_VERSION}
    core["generation"] = {"quantization": None, **core["generation"]}  # v1 knew only unquantized teachers
    fp = kds.fingerprint(core)
    fs, root = kio.open_fs(dest)
    if kds.read_manifest(fs, root) is not None:
        raise KdError(f"{dest} is itself a dataset; give the root that should hold the upgraded one (it lands at DEST/<fingerprint>)")
    target, url = kio.join(root, fp), dest.rstrip("/") + "/" + fp
    if kds.read_manifest(fs, target) is not None:
        return url
    vocab, k = old["tokenizer"]["embedding_rows"], ds.k
    shards = []
    for entry, path in zip(ds.shards, ds.shard_paths()):
        with ds.fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            table = pf.read()
            rows = codec.decode_any(table, k, metadata=pf.schema_arrow.metadata).to_rows()
        for r, messages, prompt in zip(rows, table["messages"].to_pylist(), table["prompt"].to_pylist()):
            r.messages, r.prompt, r.tail_logprobs = messages, prompt, None  # the tail: from the values v1 kept
        name = entry["path"].rsplit("/", 1)[-1]
        shards.append(kds.write_shard(fs, target, name, codec.rows_to_table(rows, vocab, k), fp))
    tokens, nbytes = sum(s["tokens"] for s in shards), sum(s["bytes"] for s in shards)
    manifest = {
        **old,
        "generation": core["generation"],
        "format_version": codec.FORMAT_VERSION,
        "fingerprint": fp,
        "kdgen_version": kdgen.__version__,
        "created": kio.now_iso(),
        "encoding": codec.encoding_info(vocab),
        "shards": shards,
        "totals": {"rows": sum(s["rows"] for s in shards), "tokens": tokens, "bytes": nbytes, "bytes_per_token": round(nbytes / tokens, 2) if tokens else None},
        "fingerprint_fields": list(kds.FINGERPRINT_FIELDS),
        "upgraded_from": {"fingerprint": old["fingerprint"], "format_version": old["format_version"], "kdgen_version": old.get("kdgen_version"), "created": old.get("created")},
    }
    write_card(fs, target, manifest)
    kds.write_manifest(fs, target, manifest)
    _, problems = verify(url)
    if problems:  # never expected: the v2 writer keeps every invariant
        raise KdError(f"{url}: the upgraded dataset fails verification: {problems[0]}; report this as a bug")
    return url
