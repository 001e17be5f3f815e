"""transformers backend: our own decode loop over a KV cache, batched with left padding.

Why not `model.generate`: it cannot give each row its own sampling seed, and we need the raw
temperature-1 log-probs beside whatever sampling filter is in force. The loop is short: one
forward over the padded prompts, then one token per step for the whole batch.

With `sampled_targets` = N > 0 each position also gets N draws from the teacher's full
distribution (`kdcore.sampled_targets.draw`, keyed by the request's seed and the position), from the
same temperature-1 log-softmax the top-k comes from.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from kdcore.backends import Output, Request, SamplingConfig
from kdcore.codec import SampledTargets
from kdcore.sampled_targets import draw

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k and top-p filtering for sampling. logits: [B, V] float32."""
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= cfg.top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


class HFBackend:
    name = "hf"

    def __init__(self, model_path: str, dtype: str = "float32", batch_size: int = 8, model=None, sampled_targets: int = 0):
        self.model = model if model is not None else AutoModelForCausalLM.from_pretrained(
            model_path, dtype=DTYPES[dtype], trust_remote_code=False
        )
        self.model.eval()
        self.batch_size = batch_size
        self.sampled_targets = sampled_targets
        self.eos = _eos_ids(self.model)
        cfg = self.model.config
        self.pad_id = next(iter(self.eos), 0) if getattr(cfg, "pad_token_id", None) is None else cfg.pad_token_id

    def close(self) -> None:
        pass

    # -- generation -------------------------------------------------------------------------------

    def generate(self, requests: list[Request], cfg: SamplingConfig) -> list[Output]:
        out: list[Output] = []
        for i in range(0, len(requests), self.batch_size):
            out.extend(self._generate_batch(requests[i : i + self.batch_size], cfg))
        return out

    @torch.no_grad()
    def _generate_batch(self, reqs: list[Request], cfg: SamplingConfig) -> list[Output]:
        b = len(reqs)
        plen = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((b, plen), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, plen), dtype=torch.long)
        for j, r in enumerate(reqs):
            ids[j, plen - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[j, plen - len(r.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator().manual_seed(r.seed) for r in reqs]
        tokens: list[list[int]] = [[] for _ in reqs]
        tok_lp: list[list[float]] = [[] for _ in reqs]
        top_ids: list[list[np.ndarray]] = [[] for _ in reqs]
        top_lp: list[list[np.ndarray]] = [[] for _ in reqs]
        drawn: list[list[SampledTargets]] = [[] for _ in reqs]
        finish = ["length"] * b
        done = torch.zeros(b, dtype=torch.bool)
        cache = None
        step_ids, step_pos = ids, positions
        for _ in range(cfg.max_new_tokens):
            res = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,  # only the last position: no [batch, prompt, vocab] logits at prefill
            )
            cache = res.past_key_values
            logits = res.logits[:, -1, :].float()
            logp = torch.log_softmax(logits, dim=-1)
            tv, ti = torch.topk(logp, cfg.k, dim=-1)
            if cfg.temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(_filter_logits(logits, cfg), dim=-1)
                nxt = torch.stack([torch.multinomial(probs[j], 1, generator=gens[j])[0] for j in range(b)])
            chosen = logp.gather(-1, nxt[:, None])[:, 0]
            live = [j for j in range(b) if not done[j]]
            if self.sampled_targets and live:  # position len(tokens[j]) of each live row
                step = draw(logp[live], self.sampled_targets, [reqs[j].seed for j in live], [len(tokens[j]) for j in live])
                for i, j in enumerate(live):
                    drawn[j].append(SampledTargets(step.lengths[i : i + 1], *step.position(i)))
            for j in range(b):
                if done[j]:
                    continue
                t = int(nxt[j])
                tokens[j].append(t)
                tok_lp[j].append(float(chosen[j]))
                top_ids[j].append(ti[j].numpy())
                top_lp[j].append(tv[j].numpy())
                if t in self.eos:
                    done[j] = True
                    finish[j] = "stop"
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype)], dim=-1)
        return [self._output(tokens[j], tok_lp[j], top_ids[j], top_lp[j], finish[j], cfg.k, drawn[j]) for j in range(b)]

    def _output(self, tokens, lps, tids, tlps, finish, k, drawn) -> Output:
        t = len(tokens)
        return Output(
            completion_ids=tokens,
            token_logprobs=np.asarray(lps, dtype=np.float32),
            topk_ids=np.stack(tids).astype(np.int64) if t else np.zeros((0, k), np.int64),
            topk_logprobs=np.stack(tlps).astype(np.float32) if t else np.zeros((0, k), np.float32),
            finish_reason=finish,
            sampled=SampledTargets.concat(drawn) if self.sampled_targets else None,
        )

    # -- teacher forcing --------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, requests: list[Request], k: int) -> list[Output]:
        """Top-k log-probs of the teacher at every completion position, given prompt + completion."""
        out = []
        for r in requests:
            full = torch.tensor([r.prompt_ids + r.completion_ids])
            logits = self.model(input_ids=full).logits[0].float()
            p = len(r.prompt_ids)
            logp = torch.log_softmax(logits[p - 1 : -1], dim=-1)  # position t predicts token t+1
            tv, ti = torch.topk(logp, k, dim=-1)
            comp = torch.tensor(r.completion_ids)
            chosen = logp.gather(-1, comp[:, None])[:, 0]
            finish = "stop" if r.completion_ids and r.completion_ids[-1] in self.eos else "length"
            sampled = draw(logp, self.sampled_targets, [r.seed] * len(comp), list(range(len(comp)))) if self.sampled_targets else None
            out.append(Output(list(r.completion_ids), chosen.numpy(), ti.numpy(), tv.numpy(), finish, sampled))
        return out
