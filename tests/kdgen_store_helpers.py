"""Helpers for the issue-7 tests (stores, reuse, concurrency, crashes, corruption): a small greedy
config for the tiny model and the reference run every other run must equal, and the bucket factory
the loopback store fixtures (tests/kdgen_s3.py, tests/kdgen_gcs.py) yield."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from kdgen.generate import GenerateConfig


def small_config(prompts: str, out: str, teacher: str, **overrides) -> GenerateConfig:
    """Greedy, 8 new tokens, k=4, one prompt per shard (six prompts -> six shards: many commit
    points for the crash and concurrency tests), hf backend."""
    cfg = GenerateConfig(
        prompts=prompts, out=out, teacher=teacher, backend="hf", max_new_tokens=8, k=4, temperature=0.0, shard_prompts=1, batch_size=4
    )
    return replace(cfg, **overrides)


def cli_args(cfg: GenerateConfig) -> list[str]:
    """`kdgen generate` flags for `small_config`."""
    return [
        "generate", "--prompts", cfg.prompts, "--out", cfg.out, "--teacher", cfg.teacher, "--backend", cfg.backend,
        "--max-new-tokens", str(cfg.max_new_tokens), "--k", str(cfg.k), "--temperature", str(cfg.temperature),
        "--shard-prompts", str(cfg.shard_prompts), "--batch-size", str(cfg.batch_size),
    ]  # fmt: skip


KDGEN = str(Path(sys.executable).parent / "kdgen")
KDTRAIN = str(Path(sys.executable).parent / "kdtrain")


def child_env() -> dict[str, str]:
    """The environment as it is now (the S3 fixture adds its endpoint and credentials), one torch thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `kdgen` console script with the current environment."""
    return subprocess.run([KDGEN, *args], capture_output=True, text=True, timeout=timeout, env=child_env())


def bucket_factory(fs, scheme: str) -> Callable[[], str]:
    """`bucket() -> "<scheme>://<new bucket>"`: each call creates a new, empty bucket on `fs`."""

    def bucket() -> str:
        name = f"kd-{uuid.uuid4().hex[:12]}"
        fs.mkdir(name)
        return f"{scheme}://{name}"

    return bucket
