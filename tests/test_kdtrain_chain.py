"""`kdtrain chain` end to end on tiny models (hf backend): teacher (4 layers) -> assistant (2 of
its layers) -> student (1 of the assistant's), each link's dataset written by `kdgen generate` with
the link's teacher. A first run stops after the assistant is trained; the CLI then finishes the chain
without redoing either complete stage. The shipped TAKD recipe parses; bad recipes name the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from kdcore.errors import KdError
from kdcore.dataset import TeacherDataset
from kdtrain_helpers import peaky_model

TRAIN = {"max_steps": 2, "batch_size": 4, "lr": 3e-3, "warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    from typer.testing import CliRunner

    from kdtrain.chain import load_chain, run
    from kdtrain.cli import app

    root = tmp_path_factory.mktemp("chain")
    rows = [json.loads(line) for line in (REPO / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:4]]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows), encoding="utf-8")
    teacher = peaky_model(root / "teacher", tokenizer, seed=0, layers=4)
    recipe = root / "chain.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "teacher": teacher,
                "prompts": str(prompts),
                "out": str(root / "run"),
                "generate": {"backend": "hf", "max_new_tokens": 8, "k": 8},
                "links": [
                    {"name": "assistant", "train": {"init_from_teacher": "0,3", **TRAIN}},
                    {"name": "student", "train": {"init_from_teacher": "1", **TRAIN}},
                ],
            }
        )
    )
    first = run(load_chain(str(recipe)), stop_after="link-0/train")
    state = json.loads((root / "run" / "chain_state.json").read_text())
    res = CliRunner().invoke(app, ["chain", "--recipe", str(recipe)])
    assert res.exit_code == 0, res.output
    return {
        "root": root, "teacher": teacher, "first": first, "first_state": state, "output": res.output,
        "state": json.loads((root / "run" / "chain_state.json").read_text()),
    }


def test_the_second_dataset_names_the_assistant_as_its_teacher(world):
    stages = world["state"]["stages"]
    assistant = stages["link-0/train"]["checkpoint"]
    assert world["first"] == assistant
    first, second = TeacherDataset(stages["link-0/generate"]["dataset"]), TeacherDataset(stages["link-1/generate"]["dataset"])
    assert Path(first.manifest["teacher"]["path"]) == Path(world["teacher"]).resolve()
    assert Path(second.manifest["teacher"]["path"]) == Path(assistant).resolve()
    assert second.manifest["teacher"]["source"].endswith(assistant)
    assert first.num_rows == second.num_rows == 4  # the same prompts
    kd = json.loads((Path(stages["link-1/train"]["checkpoint"]) / "kd_config.json").read_text())
    assert kd["fingerprints"] == [second.fingerprint]
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(assistant).num_hidden_layers == 2
    assert AutoConfig.from_pretrained(stages["link-1/train"]["checkpoint"]).num_hidden_layers == 1


def test_a_rerun_redoes_nothing_complete(world):
    before, after = world["first_state"]["stages"], world["state"]["stages"]
    assert list(before) == ["link-0/generate", "link-0/train"]
    for name, rec in before.items():
        assert after[name] == rec
        assert f"{name}: done earlier" in world["output"]
    assert list(after) == ["link-0/generate", "link-0/train", "link-1/generate", "link-1/train"]


def test_the_takd_recipe_parses():
    from kdtrain.chain import load_chain

    cfg = load_chain("takd")
    assert [ln.name for ln in cfg.links] == ["assistant", "student"]
    assert len(cfg.links[0].train["init_from_teacher"].split(",")) == 15
    assert len(cfg.links[1].train["init_from_teacher"].split(",")) == 6
    with pytest.raises(KdError, match="chain recipe"):
        from kdtrain.config import load_config

        load_config("takd", {"data": ["x"], "student": "y"})


def test_bad_recipes_name_the_key(tmp_path):
    from kdtrain.chain import load_chain

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"teacher": "t", "prompts": "p", "links": [{"name": "a", "train": {"loss": "nope", "out": "x"}}], "extra": 1}))
    with pytest.raises(KdError) as e:
        load_chain(str(bad))
    msg = str(e.value)
    assert "unknown key 'extra'" in msg and "links[0].train.out" in msg and "--loss nope" in msg


def test_engine_memory_settings_are_passed_on_not_pinned(tmp_path):
    """`generate: {engine_arg: [...], gpu_memory_utilization: ...}` reach every link's `kdgen
    generate` (a rerun after a KV-cache error may add them) and leave the pinned options alone."""
    from kdtrain.chain import load_chain

    doc = {"teacher": "t", "prompts": "p", "generate": {"k": 8}, "links": [{"name": "a", "train": {"init_from_teacher": "0,1"}}]}
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(doc))
    tuned = tmp_path / "tuned.yaml"
    doc["generate"] = {"k": 8, "engine_arg": ["kv_cache_memory_bytes=268435456"], "gpu_memory_utilization": 0.5}
    tuned.write_text(yaml.safe_dump(doc))
    a, b = load_chain(str(plain)), load_chain(str(tuned))
    assert b.generate["engine_arg"] == ["kv_cache_memory_bytes=268435456"] and b.generate["gpu_memory_utilization"] == 0.5
    assert a.options() == b.options()
