"""kdcore: the ground floor the three stages share.

    bench/                       measures the stages (imports anything below)
    kdgen    kdtrain    kdeval   three peer stages: each imports kdcore and itself, never another stage
    kdcore                       the teacher-dataset format and its reader, errors and the CLI runner,
                                 config fields, progress, model specs and teacher identity, inference
                                 backends (hf, vLLM), prompts, tokenizer alignment and vocabulary
                                 mapping, the sparse divergences

Modules: `format` (schema, rows, shards, manifest, `TeacherDataset` — the one reader), `verify`
(the format's invariants), `card` (the dataset card), `teacher_data` (datasets opened together for
a later stage, the prompt encoding rule), `errors` (`KdError`, `run_cli`), `config` (typed config
fields whose docs are the CLI help), `progress`, `models` (model specs), `teacher` (tokenizer and
teacher identity), `prompts`, `backends` (hf and vLLM generation/scoring), `align`, `vocab_map` and
`crosstok` (two tokenizers over one text), `divergences` (the sparse KD divergences).

Importing kdcore never imports vLLM (only `kdcore.backends.vllm_backend` does), and never imports a
stage. `tests/test_boundaries.py` checks both in fresh interpreters.
"""

__version__ = "0.1.0"
