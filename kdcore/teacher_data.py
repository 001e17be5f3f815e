"""Teacher datasets opened together for a later stage, and the student-side prompt encoding.

`open_teacher_data` opens one or more teacher datasets (verified, same teacher, tokenizer and k);
kdtrain trains on them and kdeval scores on them. `encode_prompts` turns a row's (messages, prompt)
into a model's own prompt ids (its chat template for chats), the rule both stages follow.

Test: `pytest tests/test_kdtrain_train.py tests/test_kdeval_crosstok.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdcore.errors import KdError
from kdcore.dataset import TeacherDataset
from kdcore.teacher import tokenizer_identity
from kdcore.verify import require_valid


@dataclass
class TeacherData:
    """One or more teacher datasets of the same teacher, tokenizer and k."""

    datasets: list[TeacherDataset]

    @property
    def manifest(self) -> dict:
        return self.datasets[0].manifest

    @property
    def k(self) -> int:
        return self.datasets[0].k

    @property
    def num_rows(self) -> int:
        return sum(d.num_rows for d in self.datasets)

    @property
    def num_tokens(self) -> int:
        return sum(d.num_tokens for d in self.datasets)

    def describe(self) -> list[dict]:
        """What kd_config.json records about each dataset."""
        return [
            {
                "url": d.url,
                "fingerprint": d.fingerprint,
                "teacher": d.manifest["teacher"]["source"],
                "teacher_weights_hash": d.manifest["teacher"]["weights_hash"],
                "tokenizer_hash": d.manifest["tokenizer"]["tokenizer_hash"],
                "k": d.k,
                "sampled_targets": d.sampled_targets,
                "rows": d.num_rows,
                "tokens": d.num_tokens,
            }
            for d in self.datasets
        ]


def open_teacher_data(urls: list[str]) -> TeacherData:
    """Open, verify (checksums) and cross-check the datasets; KdError on the first problem."""
    opened = []
    for url in urls:
        ds = TeacherDataset(url)
        require_valid(ds.url)
        if ds.num_rows == 0 or ds.num_tokens == 0:
            raise KdError(f"--data {url}: the dataset is empty ({ds.num_rows} rows, {ds.num_tokens} tokens); nothing to train on")
        opened.append(ds)
    first = opened[0]
    for ds in opened[1:]:
        for what, key in (("teacher", ("teacher", "weights_hash")), ("tokenizer", ("tokenizer", "tokenizer_hash"))):
            a, b = first.manifest[key[0]][key[1]], ds.manifest[key[0]][key[1]]
            if a != b:
                raise KdError(
                    f"--data {ds.url} has a different {what} ({ds.manifest['teacher']['source']}, {b[:12]}) than "
                    f"--data {first.url} ({first.manifest['teacher']['source']}, {a[:12]}); train on one teacher's datasets at a time"
                )
        if ds.k != first.k:
            raise KdError(f"--data {ds.url} has k={ds.k} but --data {first.url} has k={first.k}; mixed datasets must share k")

    return TeacherData(opened)


def same_tokenizer(manifest: dict, tokenizer, embedding_rows: int) -> bool:
    """Whether the student's tokenizer is the teacher's (by tokenizer hash; embedding rows may differ)."""
    return tokenizer_identity(tokenizer, embedding_rows)["tokenizer_hash"] == manifest["tokenizer"]["tokenizer_hash"]


def _prompt_text(tokenizer, messages: list[dict] | None, prompt: str | None) -> str:
    if not messages:
        return prompt or ""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n\n"  # no chat template: the turns as plain paragraphs


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, in one batched call (a fast tokenizer encodes them in parallel)."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def encode_prompts(tokenizer, prompts: list[tuple[list[dict] | None, str | None]]) -> list[list[int]]:
    """The student's ids of each (messages, prompt): its chat template for chats, plain prompts raw."""
    return encode_texts(tokenizer, [_prompt_text(tokenizer, m, p) for m, p in prompts])
