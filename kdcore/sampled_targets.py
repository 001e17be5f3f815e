"""Random-sampled teacher targets (RS-KD): N draws per position from the teacher's full distribution.

Sparse Logit Sampling (Anshumann et al., ACL 2025, "Sparse Logit Sampling: Accelerating Knowledge
Distillation in LLMs"): instead of the teacher's top-k, store for every completion position the
distinct ids among N tokens drawn *with replacement* from the teacher's distribution at
temperature 1 (the proposal is the teacher itself), how often each was drawn, and the teacher's
log-prob of each. With counts c_i, t_hat_i = c_i / N is an unbiased estimate of the teacher
probability t_i (the counts are Multinomial(N, t)), so the forward-KL loss
sum_i t_hat_i (log t_i - log q_i) has, in expectation, the full-vocabulary forward-KL gradient
q_j - t_j with respect to the student's logits (`kdcore.divergences.sampled_fkl_per_token`). Top-k
caching is biased: its tail gets no supervision at all.

The draws are reproducible and independent per position: position t of a row draws from its own
generator, keyed by the row's seed (from `--seed` and the row id, `kdcore.backends.request_seed`)
and t, so the same seed gives the same rows whichever backend batches the positions and however
(`kdgen generate` draws one position per decode step, `kdgen score` all of a row's at once).

`draw` runs where the backend has the position's full log-softmax ([P, V]); the columns it feeds
are `sampled_ids`, `sampled_counts`, `sampled_logprobs` (kdcore/codec.py, docs/FORMAT.md).

Test: `pytest tests/test_kdgen_sampled.py`.
"""

from __future__ import annotations

import numpy as np
import torch

from kdcore.codec import SampledTargets


def uniforms(seed: int, position: int, n: int) -> np.ndarray:
    """[n] float64 uniforms in [0, 1) of one position: its own generator, keyed by (seed, position)."""
    return np.random.default_rng([seed, position]).random(n)


@torch.no_grad()
def draw(logp: torch.Tensor, n: int, seeds: list[int], positions: list[int]) -> SampledTargets:
    """N draws with replacement from each row of `logp`, by inverse CDF on seeded uniforms.

    logp: [P, V] the teacher's log-softmax at temperature 1 (any float dtype), one row per position.
    seeds, positions: [P] the row seed and completion position of each (they key its uniforms).
    returns: the P positions' distinct ids, counts and log-probs (SampledTargets over P positions).
    """
    p_rows = logp.shape[0]
    if p_rows == 0:
        return SampledTargets.empty()
    lp = logp.detach().to("cpu", torch.float64)
    cdf = lp.exp().cumsum(-1)  # [P, V]; float64 so that tokens of probability ~1e-12 keep their interval
    u = torch.from_numpy(np.stack([uniforms(s, t, n) for s, t in zip(seeds, positions)]))  # [P, N]
    # token i is drawn when cdf[i-1] <= u * total < cdf[i]: zero-probability tokens have an empty interval
    drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=lp.shape[1] - 1)  # [P, N]
    lengths, ids, counts, lps = [], [], [], []
    for row in range(p_rows):
        uniq, cnt = torch.unique(drawn[row], return_counts=True)
        row_lp = lp[row, uniq]
        order = torch.argsort(-row_lp, stable=True)  # most likely first (ties: by id, as unique sorts them)
        lengths.append(len(uniq))
        ids.append(uniq[order].numpy())
        counts.append(cnt[order].numpy())
        lps.append(row_lp[order].numpy().astype(np.float32))
    return SampledTargets(np.asarray(lengths, np.int64), np.concatenate(ids).astype(np.int64), np.concatenate(counts).astype(np.int64), np.concatenate(lps))
