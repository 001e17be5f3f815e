"""Safety (issue 7, item 7): no pickle in the data path (safetensors and Parquet only;
`weights_only=True` wherever torch loads a file), no code shipped with a checkpoint is ever run
(`trust_remote_code` is off and never prompts). Shard-path confinement is tested in
tests/test_kdgen_corruption.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO
from kdcore.errors import KdError

PACKAGES = ("kdgen", "kdtrain", "kdeval")
FORBIDDEN = {
    r"\bimport\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b": "a pickle-family module",
    r"\bfrom\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b": "a pickle-family module",
    r"\bpickle\.": "pickle",
    r"read_pickle|to_pickle": "pandas pickle I/O",
    r"allow_pickle\s*=\s*True": "numpy pickle loading",
    r"trust_remote_code\s*=\s*True": "running code shipped with a checkpoint",
}


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]


def test_no_pickle_or_remote_code_in_the_packages():
    found = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for pattern, what in FORBIDDEN.items():
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{path.relative_to(REPO)}:{line}: {what}")
        # torch.load unpickles unless weights_only=True is passed in the same call
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start() : text.find(")", m.start()) + 1]
            if "weights_only=True" not in call:
                found.append(f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}: torch.load without weights_only=True")
    assert found == []


def test_kdgen_model_loaders_refuse_remote_code_explicitly():
    """Every from_pretrained / LLM(...) in kdgen says trust_remote_code=False, so transformers never
    even asks on a terminal whether to run a checkpoint's code."""
    missing = []
    for path in sorted((REPO / "kdgen").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"\.from_pretrained\(|\bLLM\(", text):
            if "#" in text[text.rfind("\n", 0, m.start()) + 1 : m.start()]:
                continue  # in a comment
            depth, i = 0, m.end() - 1
            while True:  # the whole call, nested parentheses included
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                if depth == 0:
                    break
                i += 1
            if "trust_remote_code=False" not in text[m.start() : i]:
                missing.append(f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}")
    assert missing == []


def test_a_checkpoint_with_custom_code_is_refused_without_running_it(tmp_path):
    from kdcore.teacher import load_teacher

    model = tmp_path / "evil"
    model.mkdir()
    (model / "config.json").write_text(
        '{"model_type": "kd_evil", "architectures": ["EvilModel"], '
        '"auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}'
    )
    (model / "evil.py").write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('remote code ran')\n")
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(KdError, match="trust_remote_code"):
        load_teacher(str(model), "float32")
    assert not (model / "RAN").exists()


def test_datasets_and_checkpoints_hold_no_pickles(tmp_path, tiny_model_dir):
    """What kdgen writes is Parquet + JSON + Markdown; the models it converts are safetensors."""
    from kdgen_helpers import CHAT_ROWS, write_jsonl
    from kdgen_store_helpers import small_config

    import kdgen.generate as gen

    url = gen.run(small_config(write_jsonl(tmp_path / "p.jsonl", CHAT_ROWS[:1]), str(tmp_path / "out"), tiny_model_dir))
    suffixes = {p.suffix for p in Path(url).rglob("*") if p.is_file()}
    assert suffixes <= {".parquet", ".json", ".md"}
    assert not any(Path(tiny_model_dir).glob("*.bin")) and not any(Path(tiny_model_dir).glob("*.pt"))
