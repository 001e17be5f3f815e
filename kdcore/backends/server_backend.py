"""Server backend (`--backend server --server-url URL`): a teacher served by vLLM's OpenAI-compatible
server, on another box or many GPUs, that never enters this process's memory (issue 13).

Same interface and same rows as the in-process `vllm` backend (kdcore/backends/vllm_backend.py):

* requests go to `/v1/completions` with the prompt as **token ids** (kd applied the chat template)
  and come back as token ids (`return_token_ids`, `return_tokens_as_token_ids`), never strings;
* `logprobs=k` gives the top-k per completion token; `kdgen score` sends prompt + completion with
  `max_tokens=1, prompt_logprobs=k` (teacher-forced);
* sampling settings are all explicit (the server's generation-config defaults would otherwise fill
  in penalties), with the per-row seed, so greedy rows equal the in-process engine's;
* at most `concurrency` requests are in flight (a thread pool over stdlib HTTP); timeouts, refused
  connections and 5xx answers are retried with exponential backoff; when the retries run out the
  run stops with one `KdError` — the shard being generated stays unwritten, complete shards stay,
  and the same command resumes once the server is back.

Before the first row it refuses a server that is not the dataset's teacher: the served model must
be the `--teacher` checkpoint (by path or hub id), its tokenizer must encode fixed strings exactly
as the local one does (`/tokenize`), its context must hold the longest request, and its log-probs
must be the raw temperature-1 ones (`--logprobs-mode raw_logprobs`, the default): a sampled and a
greedy request on the same prompt must report the same distribution.

Server flags kd needs (README "Scaling out"):
    vllm serve <teacher> --max-logprobs <k> --logprobs-mode raw_logprobs --generation-config vllm

Test: `pytest -m slow tests/test_kdgen_server.py` (a real vLLM server on 127.0.0.1).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kdcore.backends import Output, Request, SamplingConfig
from kdcore.errors import KdError

# Strings the local and the served tokenizer must encode identically (byte-level BPE edge cases,
# non-ASCII, digits, code, a chat-template marker).
TOKENIZER_PROBES = (
    "Hello world",
    " The quick brown fox jumps over the lazy dog.",
    "Übersetze „Guten Morgen“ ☀ — 12345 67.89",
    "def f(x):\n    return x ** 2\n",
    "<|im_start|>user\nHi<|im_end|>",
)
RESUME = "complete shards are kept: run the same command again to resume once the server is up"


class ServerBackend:
    name = "server"

    def __init__(
        self,
        url: str,
        k: int,
        max_model_len: int,
        tokenizer,
        teacher_names: tuple[str, ...],
        eos_ids: set[int] = frozenset(),
        concurrency: int = 32,
        timeout: float = 600.0,
        retries: int = 5,
    ):
        self.url = url.rstrip("/")
        for suffix in ("/v1/completions", "/v1"):
            if self.url.endswith(suffix):
                self.url = self.url[: -len(suffix)]
        self.k, self.timeout, self.retries = k, timeout, retries
        self.eos_ids = set(eos_ids)  # a scored completion ending in one of them finished with `stop`
        self._gave_up = threading.Event()  # one request out of retries stops the others' retrying
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="kd-server")
        self.model = self._check_model(teacher_names, max_model_len)
        self._check_tokenizer(tokenizer)
        self._check_raw_logprobs(tokenizer.encode(TOKENIZER_PROBES[1], add_special_tokens=False))

    # -- HTTP ---------------------------------------------------------------------------------------

    def _call(self, path: str, body: dict | None = None, retries: int | None = None) -> dict:
        """GET (body None) or POST JSON; retry what a restart or a busy server explains."""
        retries = self.retries if retries is None else retries
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get("KD_SERVER_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['KD_SERVER_API_KEY']}"
        last = ""
        for attempt in range(retries + 1):
            if self._gave_up.is_set():
                raise KdError(f"--server-url {self.url}: another request gave up; {RESUME}")
            req = urllib.request.Request(self.url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if e.code < 500:
                    raise KdError(f"--server-url {self.url}: {path} answered {e.code}: {detail}{_hint(detail)}") from None
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < retries:
                time.sleep(min(0.5 * 2**attempt, 30.0))
        self._gave_up.set()
        raise KdError(f"--server-url {self.url}: {path} failed {retries + 1} times ({last}); is the server up? {RESUME}")

    def _map(self, bodies: list[dict]) -> list[dict]:
        """POST every body to /v1/completions, at most `concurrency` at once; answers in order."""
        futures = [self._pool.submit(self._call, "/v1/completions", b) for b in bodies]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    # -- the checks before the first row ------------------------------------------------------------

    def _check_model(self, teacher_names: tuple[str, ...], needed_len: int) -> str:
        models = self._call("/v1/models").get("data") or []
        if not models:
            raise KdError(f"--server-url {self.url}: the server lists no model at /v1/models")
        m = models[0]
        if m.get("owned_by") != "vllm":
            raise KdError(
                f"--server-url {self.url}: the server is {m.get('owned_by')!r}, not vLLM; kd needs vLLM's token-id "
                f"and raw-log-prob options (`vllm serve <teacher> --max-logprobs K --logprobs-mode raw_logprobs`)"
            )
        served = {m.get("id"), m.get("root")} - {None}
        ours = set(teacher_names)
        if not ({os.path.basename(str(s).rstrip("/")) for s in served} & {os.path.basename(t.rstrip("/")) for t in ours} or served & ours):
            raise KdError(
                f"--server-url {self.url} serves {sorted(served)}, but --teacher is {sorted(ours)}: serve the "
                f"teacher's checkpoint, or pass the served checkpoint as --teacher"
            )
        max_len = m.get("max_model_len")
        if isinstance(max_len, int) and max_len < needed_len:
            raise KdError(
                f"--server-url {self.url}: the server's context ({max_len} tokens) is shorter than the longest request "
                f"({needed_len}); restart it with --max-model-len {needed_len} or lower --max-new-tokens"
            )
        return m["id"]

    def _check_tokenizer(self, tokenizer) -> None:
        for text in TOKENIZER_PROBES:
            served = self._call("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})["tokens"]
            local = tokenizer.encode(text, add_special_tokens=False)
            if list(served) != list(local):
                raise KdError(
                    f"--server-url {self.url}: the server's tokenizer differs from the teacher's ({text!r} -> {served[:8]} "
                    f"there, {local[:8]} here); serve the --teacher checkpoint with its own tokenizer"
                )

    def _check_raw_logprobs(self, prompt_ids: list[int]) -> None:
        """Raw log-probs do not depend on the sampling temperature, processed ones do."""
        k = min(self.k, 5)
        base = {"model": self.model, "prompt": prompt_ids, "max_tokens": 1, "logprobs": k, "seed": 0, **_NEUTRAL}
        greedy, hot = self._map([{**base, "temperature": 0.0}, {**base, "temperature": 1.7}])
        a = _top(greedy["choices"][0]["logprobs"]["top_logprobs"][0])
        b = _top(hot["choices"][0]["logprobs"]["top_logprobs"][0])
        common = set(a) & set(b)
        if any(v > 1e-4 for v in a.values()) or np.exp(list(a.values())).sum() > 1 + 1e-3 or any(abs(a[i] - b[i]) > 1e-4 for i in common):
            raise KdError(
                f"--server-url {self.url}: the server's log-probs change with the sampling temperature or are not "
                f"normalised; restart it with --logprobs-mode raw_logprobs (kd stores the teacher's temperature-1 distribution)"
            )

    # -- the backend interface ----------------------------------------------------------------------

    def generate(self, requests: list[Request], cfg: SamplingConfig) -> list[Output]:
        bodies = [
            {
                "model": self.model,
                "prompt": r.prompt_ids,
                "max_tokens": cfg.max_new_tokens,
                "temperature": cfg.temperature,
                "top_p": cfg.top_p,
                "top_k": cfg.top_k if cfg.top_k > 0 else -1,
                "seed": r.seed,
                "logprobs": cfg.k,
                **_NEUTRAL,
            }
            for r in requests
        ]
        return [self._to_output(ans["choices"][0], cfg.k) for ans in self._map(bodies)]

    def _to_output(self, choice: dict, k: int) -> Output:
        ids = [int(i) for i in choice.get("token_ids") or [_token_id(t) for t in choice["logprobs"]["tokens"]]]
        lp = choice["logprobs"]
        topk_ids = np.zeros((len(ids), k), np.int64)
        topk_lps = np.zeros((len(ids), k), np.float32)
        for t, entry in enumerate(lp["top_logprobs"]):
            # k entries, or k + 1 when the sampled token is outside the top-k; the sampled one comes first
            ranked = sorted(_top(entry).items(), key=lambda kv: -kv[1])[:k]
            topk_ids[t] = [i for i, _ in ranked]
            topk_lps[t] = [v for _, v in ranked]
        if choice.get("finish_reason") not in ("stop", "length"):
            raise KdError(f"--server-url {self.url}: a request ended with {choice.get('finish_reason')!r}; {RESUME}")
        return Output(ids, np.asarray(lp["token_logprobs"], np.float32), topk_ids, topk_lps, choice["finish_reason"])

    def score(self, requests: list[Request], k: int) -> list[Output]:
        """Teacher-forced: prompt log-probs over prompt + completion, kept for the completion part."""
        bodies = [
            {
                "model": self.model,
                "prompt": r.prompt_ids + r.completion_ids,
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": 1,
                "prompt_logprobs": k,
                "seed": r.seed,
                **_NEUTRAL,
            }
            for r in requests
        ]
        eos = self.eos_ids
        out = []
        for r, ans in zip(requests, self._map(bodies)):
            per_pos = ans["choices"][0]["prompt_logprobs"]  # [None, {id: {logprob, rank}}, ...]
            p, t = len(r.prompt_ids), len(r.completion_ids)
            tok_lp = np.zeros(t, np.float32)
            ids = np.zeros((t, k), np.int64)
            lps = np.zeros((t, k), np.float32)
            for j in range(t):
                entry = {int(i): v for i, v in per_pos[p + j].items()}
                tok_lp[j] = entry[r.completion_ids[j]]["logprob"]
                ranked = sorted((v["rank"], i, v["logprob"]) for i, v in entry.items() if v["rank"] <= k)[:k]
                ids[j] = [i for _, i, _ in ranked]
                lps[j] = [v for _, _, v in ranked]
            finish = "stop" if r.completion_ids and r.completion_ids[-1] in eos else "length"
            out.append(Output(list(r.completion_ids), tok_lp, ids, lps, finish))
        return out

    def close(self) -> None:
        self._gave_up.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


# Penalties and filters that would change the sampled tokens: explicit, so the server's
# generation-config defaults never apply (the in-process engine uses SamplingParams' defaults).
_NEUTRAL = {
    "n": 1,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "min_p": 0.0,
    "min_tokens": 0,
    "ignore_eos": False,
    "return_token_ids": True,
    "return_tokens_as_token_ids": True,
}


def _token_id(token: str) -> int:
    """`token_id:123` (vLLM's `return_tokens_as_token_ids`) -> 123."""
    return int(token.rsplit(":", 1)[1])


def _top(entry: dict) -> dict[int, float]:
    return {_token_id(t): float(v) for t, v in entry.items()}


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read())
        msg = body.get("error", body)
        return str(msg.get("message", msg) if isinstance(msg, dict) else msg)[:300]
    except Exception:
        return str(e.reason)


def _hint(detail: str) -> str:
    if "logprobs" in detail and "max" in detail:
        return " (restart the server with --max-logprobs >= --k)"
    return ""
