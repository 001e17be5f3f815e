"""The typed config of `kdgen generate` and `kdgen score`, and its validation.

Each field's doc text is its flag's help (the CLI is generated from this class by `kdcore.cli`);
`validate(cfg, kind)` collects every problem into one `ConfigError` naming the flags.
Test: `pytest tests/test_kdgen_errors.py` (through the console script) and `tests/test_cli.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdcore.backends import vllm_available
from kdcore.config import doc_field as _f
from kdcore.config import Documented, sampling_problems
from kdcore.errors import collect
from kdcore.codec import MAX_DRAWS
from kdgen.scale import scale_problems


@dataclass
class GenerateConfig(Documented):
    prompts: str = _f("", "Prompt file (.jsonl, .parquet, .csv) or HF dataset directory.")
    out: str = _f("teacher-datasets", "Root directory or URL (s3://, gs://, hf://, memory://); the dataset goes to OUT/<fingerprint>.")
    teacher: str = _f("smollm2-135m-instruct", "Teacher: built-in name, .gguf file, HF checkpoint directory or hub id.")
    prompt_column: str | None = _f(None, "Column holding the prompt (chat messages or text). Default: messages, prompt, text, instruction, question or input.")
    completion_column: str = _f("completion", "Column holding the completion to score (`kdgen score` only).")
    split: str = _f("train", "Split to read from an HF dataset directory.")
    limit: int | None = _f(None, "Use only the first N prompts (after dropping duplicates).")
    backend: str = _f("auto", "Generation backend: vllm, hf, or auto (vllm where importable).")
    dtype: str = _f("auto", "Teacher dtype: float32, bfloat16, float16, or auto (float32 on CPU, bfloat16 on GPU).")
    temperature: float = _f(0.7, "Sampling temperature for the completions (0 = greedy). Stored log-probs are always at temperature 1.")
    top_p: float = _f(0.95, "Nucleus sampling for the completions (1 = off).")
    top_k: int = _f(0, "Top-k sampling filter for the completions (0 = off); not the stored k.")
    max_new_tokens: int = _f(256, "Maximum completion length in tokens.")
    n: int = _f(1, "Samples per prompt.")
    seed: int = _f(0, "Base seed; each row's seed is derived from it and the row id. It seeds the completions' sampling and the --sampled-targets draws.")
    k: int = _f(20, "How many top log-probs to store per completion token (1..vocab).")
    sampled_targets: int = _f(0, "Also store random-sampled targets (RS-KD, Anshumann et al. 2025): per completion token, N draws with replacement from the teacher's full distribution at temperature 1, seeded by --seed, kept as distinct ids, counts and teacher log-probs (sampled_* columns, docs/FORMAT.md); `kdtrain run --targets sampled` trains on them. 0 = off. Needs --backend hf (auto picks it).")
    chat_template: str = _f("auto", "auto: chat messages get the teacher's chat template, text is used raw; always: wrap text prompts as a user message.")
    shard_prompts: int = _f(128, "Prompts per shard (resume granularity). Not part of the fingerprint.")
    batch_size: int = _f(64, "Requests handed to the engine at once (progress updates per batch).")
    shard_index: int = _f(0, "This machine's slice of the prompt set (0-based); see --num-shards.")
    num_shards: int = _f(1, "Split the work over this many machines; each runs with its own --shard-index.")
    gpu_memory_utilization: float | None = _f(None, "vLLM memory fraction (on CPU: of the NUMA node's memory, weights included). Default 0.3 on CPU, 0.9 on GPU.")
    append_eos: bool = _f(True, "`kdgen score`: end each given completion with the EOS token.")
    # scaling out (README "Scaling out"): engine layout, served teachers, Ray
    tensor_parallel_size: int = _f(1, "vLLM: GPUs that split each layer of one engine (tensor parallel). Not part of the fingerprint.")
    pipeline_parallel_size: int = _f(1, "vLLM: GPUs that split the layers of one engine (pipeline parallel). Not part of the fingerprint.")
    data_parallel_size: int = _f(1, "Engine processes on this machine, each on tensor x pipeline GPUs of its own; they split the shards. Not part of the fingerprint.")
    max_model_len: int | None = _f(None, "vLLM context per sequence (sizes the KV cache). Default: the longest prompt plus --max-new-tokens.")
    quantization: str | None = _f(None, "vLLM weight quantization (fp8, awq, gptq, ...). It changes the rows, so it is part of the fingerprint.")
    engine_arg: list[str] = _f([], "Extra vLLM engine argument KEY=VALUE, repeatable (e.g. max_num_seqs=256); values are read as JSON when they parse.")
    server_url: str | None = _f(None, "--backend server: base URL of a vLLM OpenAI-compatible server (e.g. http://gpu-box:8000).")
    server_concurrency: int = _f(32, "--backend server: requests in flight at once.")
    server_timeout: float = _f(600.0, "--backend server: seconds to wait for one request before retrying it.")
    server_retries: int = _f(5, "--backend server: retries of a request after a timeout, a refused connection or a 5xx answer (backoff 0.5 s, doubling).")
    ray: str | None = _f(None, "Run the shards on a Ray cluster: its address (host:port) or auto; without a cluster, auto starts a local one.")
    replicas: int = _f(1, "--ray: how many engines to run, each on tensor x pipeline GPUs (or one CPU).")



def validate(cfg: GenerateConfig, kind: str) -> None:
    problems = []
    if not cfg.prompts:
        problems.append("--prompts is required: a .jsonl, .parquet, .csv file or an HF dataset directory")
    if cfg.backend not in ("auto", "vllm", "hf", "server"):
        problems.append(f"--backend {cfg.backend}: choose vllm, hf, server or auto")
    problems += scale_problems(cfg)
    if cfg.backend == "vllm" and not vllm_available():
        problems.append("--backend vllm: vLLM is not installed here; install '.[cpu]' or '.[gpu]', or use --backend hf")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"--dtype {cfg.dtype}: choose float32, bfloat16, float16 or auto")
    problems += sampling_problems(cfg.temperature, cfg.top_p)
    if cfg.top_k < 0:
        problems.append(f"--top-k {cfg.top_k}: must be >= 0 (0 = off)")
    if cfg.max_new_tokens < 1 and kind == "generate":
        problems.append(f"--max-new-tokens {cfg.max_new_tokens}: must be >= 1")
    if cfg.n < 1:
        problems.append(f"--n {cfg.n}: must be >= 1")
    if cfg.k < 1:
        problems.append(f"--k {cfg.k}: top-k must be between 1 and the teacher vocab")
    if not 0 <= cfg.sampled_targets <= MAX_DRAWS:
        problems.append(f"--sampled-targets {cfg.sampled_targets}: draws per position must be between 1 and {MAX_DRAWS} (0 = off)")
    if cfg.sampled_targets and cfg.backend in ("vllm", "server"):
        # measured on CPU (README "Sampled targets"): vLLM returns the full vocabulary only as Python
        # lists of vocab+1 entries per token, 18x slower scoring on SmolLM2; the server sends them as JSON
        problems.append(f"--sampled-targets needs the teacher's full distribution at every position, which only --backend hf computes in place; use --backend hf (or auto)")
    if cfg.chat_template not in ("auto", "always"):
        problems.append(f"--chat-template {cfg.chat_template}: choose auto or always")
    if cfg.shard_prompts < 1 or cfg.batch_size < 1:
        problems.append("--shard-prompts and --batch-size must be >= 1")
    if cfg.num_shards < 1 or not 0 <= cfg.shard_index < cfg.num_shards:
        problems.append(f"--shard-index {cfg.shard_index} --num-shards {cfg.num_shards}: need 0 <= index < num-shards")
    if cfg.limit is not None and cfg.limit < 1:
        problems.append(f"--limit {cfg.limit}: must be >= 1")
    collect(problems)
