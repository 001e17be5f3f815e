"""Cross-tokenizer KD parts: token bytes (round trip), the vocabulary map, byte-offset alignment,
the residual-bucket loss and the chunk-likelihood term against naive dense references.

Real pair: the Gemma 3 270M tokenizer (262,144 entries, SentencePiece-style with byte fallback)
and the SmolLM2 tokenizer (49,152, byte-level BPE), both from the packaged weights; plus two small
tokenizers trained here (byte-level BPE, and Metaspace BPE with byte fallback and a dummy prefix).
Only tokenizers are loaded; nothing is downloaded.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from kdcore.align import first_of_span, merge_candidates, span_alignment
from kdcore.divergences import DIVERGENCES, SparseKD, span_likelihood
from kdtrain.losses import fused_kd_losses
from kdcore.vocab_map import EXACT, NONE, PREFIX, TokenBytes, VocabMap
from kdtrain_helpers import ALPHA, BETA, dense_divergence, tiny_byte_level, tiny_sentencepiece

TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog. It wasn't, however, amused!",
    "code": "def reverse(s: str) -> str:\n    return s[::-1]  # slice\n\nif __name__ == \"__main__\":\n\tprint({'a': [1, 2]}, x != y)\n",
    "numbers": "3.14159 + 2,718 = 5.85959; 1e-10, 0x1F, 2024-06-01, 100000000, -42%",
    "non_ascii": "Café, naïve, Größe — “quotes” ✓ 😀👍🏽 中文字符 Привет мир ☃ e\u0301 \u200b",
    "whitespace": "  leading\n\n\n  runs   of    spaces\t\ttabs \r\n end ",
}


@pytest.fixture(scope="session")
def tokenizers_(gemma_tokenizer, tokenizer):
    """name -> (tokenizer, TokenBytes) for the four tokenizers."""
    toks = {"gemma3": gemma_tokenizer, "smollm2": tokenizer, "tiny_bpe": tiny_byte_level(), "tiny_sp": tiny_sentencepiece()}
    return {k: (t, TokenBytes.from_tokenizer(t)) for k, t in toks.items()}


@pytest.fixture(scope="session")
def gemma_to_smol(tokenizers_):
    return VocabMap.build(tokenizers_["gemma3"][1], tokenizers_["smollm2"][1])


@pytest.fixture(scope="session")
def smol_to_gemma(tokenizers_):
    return VocabMap.build(tokenizers_["smollm2"][1], tokenizers_["gemma3"][1])


def _enc(tok, text: str) -> np.ndarray:
    return np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int64)


# ----------------------------------------------------------------------------------------------
# Token bytes


def test_schemes_and_sizes(tokenizers_):
    assert tokenizers_["gemma3"][1].size == 262144 and tokenizers_["gemma3"][1].scheme == "sentencepiece"
    assert tokenizers_["smollm2"][1].size == 49152 and tokenizers_["smollm2"][1].scheme == "byte_level"
    assert tokenizers_["tiny_bpe"][1].scheme == "byte_level" and tokenizers_["tiny_sp"][1].scheme == "sentencepiece"
    assert tokenizers_["tiny_bpe"][1].size != tokenizers_["tiny_sp"][1].size


@pytest.mark.parametrize("name", ["gemma3", "smollm2", "tiny_bpe", "tiny_sp"])
@pytest.mark.parametrize("kind", list(TEXTS))
def test_round_trip_is_exact(tokenizers_, name, kind):
    tok, tb = tokenizers_[name]
    text = TEXTS[kind]
    ids = _enc(tok, text)
    lens = tb.spell(ids, text.encode("utf-8"))
    assert lens is not None, (name, kind, tb.join(ids))
    assert lens.sum() == len(text.encode("utf-8"))


def test_special_tokens_have_no_bytes_and_roles(tokenizers_):
    g, s = tokenizers_["gemma3"][1], tokenizers_["smollm2"][1]
    assert g.roles["eos"] == 1 and g.token(1) == b"" and g.special[1]
    assert s.roles["eos"] == tokenizers_["smollm2"][0].eos_token_id and s.token(s.roles["eos"]) == b""
    # byte-fallback and ▁ pieces of Gemma; Ġ/Ċ pieces of SmolLM2
    gt = tokenizers_["gemma3"][0]
    assert g.token(gt.convert_tokens_to_ids("<0xE2>")) == b"\xe2"
    assert g.token(gt.convert_tokens_to_ids("▁world")) == b" world"
    st = tokenizers_["smollm2"][0]
    assert s.token(st.convert_tokens_to_ids("Ġworld")) == b" world"
    assert s.token(st.convert_tokens_to_ids("ĊĊ")) == b"\n\n"
    assert s.token(st.convert_tokens_to_ids("Ã©")) == "é".encode()


# ----------------------------------------------------------------------------------------------
# Vocabulary map


def test_gemma_smollm2_map(tokenizers_, gemma_to_smol, smol_to_gemma):
    gt, g = tokenizers_["gemma3"]
    st, s = tokenizers_["smollm2"]
    gid, sid = gt.convert_tokens_to_ids, st.convert_tokens_to_ids
    # exact by bytes across spellings
    for gp, sp in (("▁the", "Ġthe"), ("\n\n", "ĊĊ"), ("é", "Ã©"), ("<0xE2>", "â")):
        assert gemma_to_smol.student_id[gid(gp)] == sid(sp) and gemma_to_smol.kind[gid(gp)] == EXACT, gp
        assert smol_to_gemma.student_id[sid(sp)] == gid(gp) and smol_to_gemma.kind[sid(sp)] == EXACT, sp
    # special tokens by role; Gemma's image / unused tokens map nowhere
    assert gemma_to_smol.student_id[gt.eos_token_id] == st.eos_token_id
    assert smol_to_gemma.student_id[st.eos_token_id] == gt.eos_token_id
    assert gemma_to_smol.kind[gid("<unused0>")] == NONE
    # a partial UTF-8 SmolLM2 piece (3 bytes of an emoji) -> Gemma's byte-fallback token, via prefix
    i = sid("ĠðŁĺ")
    assert smol_to_gemma.kind[i] == PREFIX and g.token(smol_to_gemma.student_id[i]) == b" "
    # every prefix mapping points at a genuine prefix of the teacher token
    for i in np.nonzero(gemma_to_smol.kind == PREFIX)[0][::997]:
        assert g.token(i).startswith(s.token(gemma_to_smol.student_id[i]))
    sm = gemma_to_smol.summary(g)
    assert sm["exact"] > 40_000 and sm["exact"] + sm["prefix"] + sm["none"] == 262144
    sm2 = smol_to_gemma.summary(s)
    assert sm2["exact"] > 0.9 * 49152


def test_exact_only_map_leaves_more_unmapped(tokenizers_, gemma_to_smol):
    exact = VocabMap.build(tokenizers_["gemma3"][1], tokenizers_["smollm2"][1], "exact")
    assert (exact.kind == PREFIX).sum() == 0
    assert (exact.kind == NONE).sum() == (gemma_to_smol.kind != EXACT).sum()


def test_same_tokenizer_maps_to_itself(tokenizers_):
    tok, tb = tokenizers_["smollm2"]
    vm = VocabMap.build(tb, tb)
    normal = ~tb.special
    assert (vm.student_id[normal] == np.arange(tb.size)[normal]).all()
    text = TEXTS["prose"]
    ids = _enc(tok, text)
    tc, sc, n = span_alignment(tb.lengths[ids], tb.lengths[ids])
    assert n == len(ids) and (tc == np.arange(n)).all() and (sc == tc).all()


# ----------------------------------------------------------------------------------------------
# Alignment


@pytest.mark.parametrize("pair", list(itertools.permutations(["gemma3", "smollm2", "tiny_bpe", "tiny_sp"], 2)))
def test_chunks_span_the_same_bytes(tokenizers_, pair):
    (ta, a), (tb_tok, b) = tokenizers_[pair[0]], tokenizers_[pair[1]]
    for text in TEXTS.values():
        raw = text.encode()
        ia, ib = _enc(ta, text), _enc(tb_tok, text)
        la, lb = a.spell(ia, raw), b.spell(ib, raw)
        # both sides end with their EOS: a final chunk of its own
        ia, ib = np.append(ia, a.roles["eos"]), np.append(ib, b.roles["eos"])
        la, lb = np.append(la, 0), np.append(lb, 0)
        tc, sc, n = span_alignment(la, lb)
        assert (tc >= 0).all() and (sc >= 0).all()
        assert (np.diff(tc) >= 0).all() and (np.diff(sc) >= 0).all()
        ea, eb = np.cumsum(la), np.cumsum(lb)
        spans_a = [raw[ea[tc == c][0] - la[tc == c][0] : ea[tc == c][-1]] for c in range(n)]
        spans_b = [raw[eb[sc == c][0] - lb[sc == c][0] : eb[sc == c][-1]] for c in range(n)]
        assert spans_a == spans_b and b"".join(spans_a) == raw
        assert tc[-1] == sc[-1] == n - 1 and (tc == n - 1).sum() == 1  # the EOS pair
        # the first token of each chunk starts at the same byte on both sides: same prefix
        fa, fb = first_of_span(tc, n), first_of_span(sc, n)
        assert ((ea - la)[fa] == (eb - lb)[fb]).all()


def test_one_sided_chunk_is_dropped():
    tc, sc, n = span_alignment(np.array([2, 3, 0]), np.array([1, 4]))  # teacher EOS, student none
    assert n == 1 and tc.tolist() == [0, 0, -1] and sc.tolist() == [0, 0]


# ----------------------------------------------------------------------------------------------
# Losses against dense references


def test_merge_candidates_sums_collisions_and_drops_unmapped():
    sid = np.array([[5, 7, 5, -1, 7, 9]])
    lp = np.log(np.array([[0.3, 0.2, 0.1, 0.1, 0.05, 0.01]]))
    ids, lps = merge_candidates(sid, lp)
    assert ids.tolist() == [[5, 7, 0, 0, 0, 9]]
    assert np.allclose(np.exp(lps[0, [0, 1, 5]]), [0.4, 0.25, 0.01])
    assert np.isneginf(lps[0, [2, 3, 4]]).all()


def _dense(t: np.ndarray, s: np.ndarray, loss: str) -> float:
    """The loss tests' textbook divergence on one pair of probability vectors (float64)."""
    return float(dense_divergence(torch.tensor(t)[None], torch.tensor(s)[None], loss)[0])


@pytest.fixture(scope="module")
def small_pair(tokenizers_):
    """Teacher = tiny_sp, student = tiny_bpe (different small vocabularies), mapped by prefix."""
    t, s = tokenizers_["tiny_sp"][1], tokenizers_["tiny_bpe"][1]
    return t, s, VocabMap.build(t, s, "prefix")


def _toy_problem(small_pair, n=6, k=8, seed=0):
    """Full teacher distributions over the teacher vocab whose top-k holds collisions and unmapped
    ids; random student logits over the student vocab (as hidden @ weight.T)."""
    t, s, vm = small_pair
    g = torch.Generator().manual_seed(seed)
    Vt, Vs, H = t.size, s.size, 16
    logits_t = torch.randn(n, Vt, generator=g, dtype=torch.float64)
    prefix_ids = np.nonzero(vm.kind == PREFIX)[0]
    by_student: dict[int, list[int]] = {}
    for i in np.nonzero(vm.student_id >= 0)[0]:
        by_student.setdefault(int(vm.student_id[i]), []).append(int(i))
    colliding = next(v for v in by_student.values() if len(v) >= 2)
    unmapped = np.nonzero(vm.kind == NONE)[0]
    assert len(prefix_ids) and len(unmapped)
    for r in range(n):  # push chosen ids into the top-k
        for j, i in enumerate([colliding[0], colliding[1], int(unmapped[0]), int(prefix_ids[r])]):
            logits_t[r, i] = 6.0 - j * 0.5
    p_t = torch.softmax(logits_t, -1)
    top = torch.topk(torch.log(p_t), k, -1)
    hidden = torch.randn(n, H, generator=g)
    weight = torch.randn(Vs, H, generator=g) * 0.7
    return p_t.numpy(), top.indices.numpy(), top.values.numpy(), hidden, weight, vm


@pytest.mark.parametrize("loss", DIVERGENCES)
def test_residual_bucket_matches_dense_reference(small_pair, loss):
    p_t, top_ids, top_lps, hidden, weight, vm = _toy_problem(small_pair)
    ids, lps = merge_candidates(vm.student_id[top_ids], top_lps)
    spec = SparseKD(loss=loss, alpha=ALPHA, beta=BETA)
    labels = torch.zeros(len(hidden), dtype=torch.long)
    h = hidden.clone().requires_grad_(True)
    total, kd_sum, _, _ = fused_kd_losses(h, weight, labels, torch.from_numpy(ids), torch.from_numpy(lps), spec, 0.0, 1.0, tile=4)
    # dense reference: full teacher distribution, coarse-grained onto the student ids its top-k maps to
    q = torch.softmax((hidden @ weight.t()).double(), -1).numpy()
    ref = 0.0
    collisions = unmapped = 0
    for r in range(len(p_t)):
        targets: dict[int, float] = {}
        for i in top_ids[r]:
            j = int(vm.student_id[i])
            if j < 0:
                unmapped += 1
                continue
            collisions += j in targets
            targets[j] = targets.get(j, 0.0) + float(p_t[r, i])
        js = list(targets)
        t_dist = np.array([targets[j] for j in js] + [1.0 - sum(targets.values())])
        s_dist = np.array([q[r, j] for j in js] + [1.0 - q[r, js].sum()])
        ref += _dense(t_dist, s_dist, loss)
    assert collisions and unmapped
    assert kd_sum.item() == pytest.approx(ref, rel=2e-4, abs=1e-5)
    # gradient: against autograd through the dense student distribution
    total.backward()
    h2 = hidden.clone().requires_grad_(True)
    logq = torch.log_softmax(h2 @ weight.t(), -1)
    s_top = logq.gather(1, torch.from_numpy(ids))
    from kdcore.divergences import sparse_kd_per_token

    sparse_kd_per_token(s_top, torch.from_numpy(lps), spec).sum().backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-5)


def test_all_masked_positions_cost_nothing(small_pair):
    """Positions off the chunk starts carry only -inf targets: zero loss, zero (finite) gradient."""
    _, _, _, hidden, weight, _ = _toy_problem(small_pair)
    ids = torch.zeros(len(hidden), 8, dtype=torch.long)
    lps = torch.full((len(hidden), 8), float("-inf"))
    h = hidden.clone().requires_grad_(True)
    total, kd, _, _ = fused_kd_losses(h, weight, torch.zeros(len(hidden), dtype=torch.long), ids, lps, SparseKD(loss="jsd"), 0.0, 1.0)
    total.backward()
    assert kd.item() == 0.0 and torch.isfinite(h.grad).all() and h.grad.abs().max() == 0


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd"])
def test_chunk_likelihood_matches_reference(loss):
    g = torch.Generator().manual_seed(1)
    n, V, H = 11, 50, 8
    hidden, weight = torch.randn(n, H, generator=g), torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (n,), generator=g)
    span_ids = torch.tensor([0, 0, 1, -1, 2, 2, 2, 3, 4, 4, -1])
    span_lps = torch.tensor([-1.5, -0.2, -4.0, -0.01, -2.5])
    spec = SparseKD(loss=loss, alpha=ALPHA, beta=BETA)
    # naive: per chunk, Bernoulli(p_teacher) vs Bernoulli(p_student)
    logq = torch.log_softmax((hidden @ weight.t()).double(), -1).gather(1, labels[:, None]).squeeze(1)
    ref = 0.0
    for c in range(5):
        ls = logq[span_ids == c].sum().item()
        pt, ps = math.exp(span_lps[c].item()), math.exp(ls)
        ref += _dense(np.array([pt, 1 - pt]), np.array([ps, 1 - ps]), loss)
    grads = []
    for chunk in (1, 3, 64):  # LM-head tiles never cut a chunk: the result does not depend on them
        h = hidden.clone().requires_grad_(True)
        total, _, _, span = fused_kd_losses(
            h, weight, labels, torch.zeros(n, 0, dtype=torch.long), torch.zeros(n, 0), spec, 0.0, 0.0, chunk, None, span_ids, span_lps, 1.0
        )
        assert span.item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
        total.backward()
        grads.append(h.grad)
    h2 = hidden.clone().requires_grad_(True)
    lq = torch.log_softmax(h2 @ weight.t(), -1).gather(1, labels[:, None]).squeeze(1)
    span_likelihood(lq, span_ids, span_lps, spec).sum().backward()
    for gr in grads:
        assert torch.allclose(gr, h2.grad, atol=1e-5)
