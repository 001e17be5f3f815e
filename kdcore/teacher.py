"""What a manifest records about a teacher: model identity and tokenizer identity.

Loads only config and tokenizer (never weights), so `kdgen generate` can compute the dataset
fingerprint — and answer a cache hit — before paying for an engine start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from kdcore.errors import KdError
from kdcore.io import canonical_json, sha256_hex, write_bytes_atomic
from kdcore.models import ResolvedModel, cache_dir, resolve
from kdcore.prompts import chat_template_of


@dataclass
class Teacher:
    model: ResolvedModel
    tokenizer: object
    config: object
    dtype: str

    @property
    def embedding_rows(self) -> int:
        return int(getattr(self.config, "vocab_size", None) or len(self.tokenizer))

    @property
    def context(self) -> int:
        for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            v = getattr(self.config, name, None)
            if isinstance(v, int) and v > 0:
                return v
        return 2048

    def tokenizer_info(self) -> dict:
        return tokenizer_identity(self.tokenizer, self.embedding_rows)

    def teacher_info(self) -> dict:
        architecture = (getattr(self.config, "architectures", None) or ["?"])[0]
        return _teacher_info(self.model, self.dtype, architecture, self.context)

    def remember(self) -> None:
        """Keep this teacher's identity on disk so a later cache hit needs no transformers import."""
        path = _identity_memo(self.model, self.dtype)
        info = self.teacher_info()
        record = {"architecture": info["architecture"], "context": info["context"], "tokenizer": self.tokenizer_info()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(None, path, json.dumps(record))
        except OSError:
            pass  # a read-only cache only costs the next cache hit a few seconds


def _teacher_info(model: ResolvedModel, dtype: str, architecture: str, context: int) -> dict:
    return {**model.identity(), "dtype": dtype, "architecture": architecture, "context": context}


def _identity_memo(model: ResolvedModel, dtype: str) -> Path:
    """Where a teacher's identity is remembered: keyed by everything it is computed from — the weights'
    hash, every other file of the checkpoint (name, size, mtime) and the tokenizer libraries' versions."""
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in Path(model.path).iterdir()
        if p.is_file() and p.suffix not in (".safetensors", ".bin", ".pt", ".gguf")
    )
    versions = []
    for pkg in ("transformers", "tokenizers"):
        try:
            versions.append(version(pkg))
        except PackageNotFoundError:
            versions.append(None)
    key = sha256_hex(canonical_json([model.path, model.weights_hash, dtype, files, versions]))[:32]
    return cache_dir() / "identities" / f"{key}.json"


def remembered_identity(model: ResolvedModel, dtype: str = "auto") -> tuple[dict, dict] | None:
    """(teacher_info, tokenizer_info) of a teacher seen before, without loading its tokenizer; None if
    it was not seen with exactly these files."""
    dtype = resolve_dtype(dtype)
    try:
        record = json.loads(_identity_memo(model, dtype).read_text())
        return _teacher_info(model, dtype, record["architecture"], record["context"]), record["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tokenizer_identity(tokenizer, embedding_rows: int) -> dict:
    """Hashes and sizes that identify a tokenizer (shared by kdgen and the trainers' checks)."""
    try:
        body = tokenizer.backend_tokenizer.to_str()
    except AttributeError:
        body = canonical_json(sorted(tokenizer.get_vocab().items()))
    template = chat_template_of(tokenizer)
    special = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")
    }
    return {
        "vocab_size": embedding_rows,
        "tokenizer_size": len(tokenizer),
        "embedding_rows": embedding_rows,
        "tokenizer_hash": sha256_hex(body),
        "chat_template_hash": sha256_hex(template) if template else None,
        "special_token_ids": special,
        "class": type(tokenizer).__name__,
    }


def resolve_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    import torch

    # float32 on CPU: vLLM and transformers agree there to 1e-4 nats (bfloat16 differs by up to 0.37)
    return "bfloat16" if torch.cuda.is_available() else "float32"


def load_teacher(spec: str, dtype: str = "auto", model: ResolvedModel | None = None) -> Teacher:
    """Config and tokenizer of the teacher `spec` (`model`: the spec already resolved)."""
    model = model or resolve(spec)  # before importing transformers (seconds): a bad spec fails at once
    from transformers import AutoConfig, AutoTokenizer

    try:
        # never run code shipped with a checkpoint (issue 7); transformers would otherwise ask on a terminal
        config = AutoConfig.from_pretrained(model.path, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=False)
    except Exception as e:
        raise KdError(f"model {spec!r}: cannot load its config/tokenizer from {model.path} ({type(e).__name__}: {e})") from None
    return Teacher(model, tokenizer, config, resolve_dtype(dtype))
