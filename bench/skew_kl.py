"""Why does skew KL lose here? The first gradient of each divergence, at two start distances.

    python bench/skew_kl.py --data <training teacher dataset> [--rows 16]

For a far cut of the teacher (6 of 30 blocks, the quality benchmark's student) and a near one (24
of 30 blocks, the demo's student), on the same `--rows` teacher rows: the sparse KL at the start,
the norm of each divergence's gradient over all student parameters, and its cosine with forward
KL's gradient. Skew KL, KL(t || a*t + (1-a)*s), caps the pull on a token the student gives far less
than the teacher (d/ds_i = -(1-a) t_i / (a t_i + (1-a) s_i), at most (1-a)/a in size, where forward
KL's -t_i/s_i is unbounded): from a far start the tokens that matter most are pulled least. Adam
rescales magnitudes, so the cosine (the direction) is the figure that carries over to training.
Writes bench/results/skew_kl.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_result  # noqa: E402

CUTS = {"far (6 of 30 blocks)": "0,6,12,18,24,29", "near (24 of 30 blocks)": "0,1,2,4,5,6,7,9,10,11,12,14,15,16,17,19,20,21,22,24,25,26,27,29"}
LOSSES = ("fkl", "skl", "srkl", "rkl")


def probe(data_url: str, layers: str, rows: int) -> dict:
    import torch

    from kdcore.divergences import SparseKD
    from kdcore.teacher_data import open_teacher_data
    from kdtrain.config import load_config
    from kdtrain.data import KDCollator, logit_examples
    from kdtrain.losses import fused_sparse_kd
    from kdtrain.student import build_student

    data = open_teacher_data([data_url])
    student = build_student(load_config(None, {"data": [data_url], "init_from_teacher": layers}), data.manifest)
    model = student.model.float().train()
    ex = logit_examples(data, 2048, "truncate", student.embedding_rows, limit=rows)
    batch = KDCollator(ex, student.tokenizer.pad_token_id or 0)([{"row": i} for i in range(ex.num_rows)])
    keep = batch["labels"][:, 1:] != -100
    labels = batch["labels"][:, 1:][keep]
    ids, lps = batch["topk_ids"][:, 1:][keep].long(), batch["topk_logprobs"][:, 1:][keep]
    params = [p for p in model.parameters() if p.requires_grad]
    grads, out = {}, {}
    for loss in LOSSES:
        model.zero_grad()
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[:, :-1][keep]
        total, kd, _ = fused_sparse_kd(hidden, model.lm_head.weight, labels, ids, lps, SparseKD(loss=loss), ce_weight=0.0)
        (total / len(labels)).backward()
        g = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
        grads[loss] = g.double()  # float64: a float32 dot product over ~10^8 entries is off by ~1% (fkl with itself gave 1.0067)
        out[loss] = {"loss_per_token": round(kd.item() / len(labels), 4), "grad_norm": round(g.norm().item(), 4)}
    for loss in LOSSES:
        out[loss]["cos_with_fkl"] = round(torch.nn.functional.cosine_similarity(grads[loss], grads["fkl"], dim=0).item(), 4)
    return {"tokens": len(labels), **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a training teacher dataset (kdgen generate)")
    ap.add_argument("--rows", type=int, default=16)
    args = ap.parse_args()
    figures = {name: probe(args.data, layers, args.rows) for name, layers in CUTS.items()}
    write_result("skew_kl", {"name": "skew_kl", "command": f"bench/skew_kl.py --data <dataset> --rows {args.rows}", "machine": machine(),
                             "setup": {"data": args.data, "cuts": CUTS, "alpha": 0.1}, "figures": figures})  # fmt: skip
    for name, f in figures.items():
        print(name, f)


if __name__ == "__main__":
    main()
